// The admin view: the served model and its adapters with their digests, loading and unloading adapters, the
// collections, and the engine's queue and batch figures read from /metrics (refreshed while the view is open).

import { $, ask, h } from "./dom.js";

/** Prometheus' text format: {"name{labels}": value}. */
export function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    const m = /^([A-Za-z_:][\w:]*(?:\{[^}]*\})?)\s+(\S+)/.exec(line);
    if (m) out[m[1]] = Number(m[2]);
  }
  return out;
}

function sum(metrics, prefix) {
  return Object.entries(metrics).filter(([k]) => k.startsWith(prefix)).reduce((a, [, v]) => a + v, 0);
}

function mean(metrics, name) {
  const n = metrics[`${name}_count`];
  return n ? `${(metrics[`${name}_sum`] / n).toFixed(3)} s` : "–";
}

function rows(table, items) {
  table.replaceChildren(...items.map((cells) => h("tr", {}, cells.map((c) => h("td", {}, c)))));
}

export function setupAdmin(state, { changed, fail }) {
  const dialog = $("#admin");
  let timer = 0;

  async function open() {
    dialog.showModal();
    await refresh();
    timer = setInterval(metrics, 2000);
  }

  async function refresh() {
    let models;
    try {
      models = (await state.api.json("GET", "/v1/models")).data;
    } catch (e) {
      return fail(e, "The models could not be listed");
    }
    const base = models.find((m) => !m.parent);
    rows($("#admin-model"), base ? [[base.id, base.digest, `${base.max_model_len} tokens`]] : []);
    rows($("#admin-adapters"), models.filter((m) => m.parent).map((m) => [m.id, m.digest,
      h("button", { type: "button", class: "danger", "aria-label": `Unload ${m.id}`, onclick: () => unload(m.id) },
        "Unload")]));
    $("#no-adapters").hidden = models.some((m) => m.parent);
    try {
      const collections = (await state.api.json("GET", "/v1/collections")).data;
      rows($("#admin-collections"), collections.map((c) => [c.id, String(c.documents), String(c.chunks), c.embedder]));
    } catch (e) {
      fail(e, "The collections could not be listed");
    }
    await metrics();
  }

  async function metrics() {
    if (!dialog.open) return clearInterval(timer);
    let m;
    try {
      m = parseMetrics(await state.api.text("/metrics"));
    } catch (e) {
      return fail(e, "/metrics could not be read");
    }
    const figures = [
      ["Requests waiting", m.fourwalls_num_requests_waiting],
      ["Requests running (batch)", m.fourwalls_num_requests_running],
      ["KV cache in use", `${((m.fourwalls_kv_cache_usage_ratio ?? 0) * 100).toFixed(1)} %`],
      ["Generations finished", sum(m, "fourwalls_requests_finished_total")],
      ["Prompt tokens", m.fourwalls_prompt_tokens_total],
      ["Generated tokens", m.fourwalls_generation_tokens_total],
      ["Mean time to first token", mean(m, "fourwalls_time_to_first_token_seconds")],
      ["Mean time between tokens", mean(m, "fourwalls_inter_token_latency_seconds")],
    ];
    $("#admin-metrics").replaceChildren(...figures.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v ?? "–"))]));
  }

  async function unload(name) {
    if (!await ask({ title: "Unload adapter", message: `Unload ${name}? Requests for it will get 404.`,
      confirm: "Unload", danger: true })) return;
    try {
      await state.api.json("DELETE", `/v1/adapters/${encodeURIComponent(name)}`);
    } catch (e) {
      return fail(e, `${name} was not unloaded`);
    }
    await Promise.all([refresh(), changed()]);
  }

  $("#load-adapter").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    const status = $("#load-status");
    status.textContent = "loading…";
    try {
      const a = await state.api.json("POST", "/v1/adapters",
        { name: $("#adapter-name").value.trim(), path: $("#adapter-path").value.trim() });
      status.textContent = `loaded ${a.id} (${a.digest})`;
      form.reset();
    } catch (err) {
      status.textContent = `not loaded: ${err.message}`;
      return;
    }
    await Promise.all([refresh(), changed()]);
  });
  dialog.addEventListener("close", () => clearInterval(timer));
  return { open };
}
