// The documents dialog: a collection's documents (those the key may read), and for admin keys creating a
// collection, uploading files (drag and drop, several at once, progress and an error per file) and removing
// documents. A key that is not an admin gets none of those controls, and the API refuses it them anyway.

import { $, ask, formatBytes, h } from "./dom.js";

const SUFFIXES = [".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".docx"];

export function setupDocuments(state, { changed, fail }) {
  const dialog = $("#documents");
  const select = $("#doc-collection");
  const path = (name) => `/v1/collections/${encodeURIComponent(name)}`;

  async function open() {
    const admin = state.me.admin;
    $("#create-collection").hidden = !admin;
    $("#upload").hidden = !admin;
    $("#uploads").replaceChildren();
    await changed();
    fill();
    dialog.showModal();
    await list();
  }

  function fill(selected = select.value || state.conv?.settings.collection) {
    select.replaceChildren(...state.collections.map((c) => h("option", { value: c.id }, c.id)));
    if (state.collections.some((c) => c.id === selected)) select.value = selected;
    $("#no-collections").hidden = state.collections.length > 0;
    $("#doc-picker").hidden = state.collections.length === 0;
  }

  async function list() {
    const body = $("#doc-rows");
    body.replaceChildren();
    $("#doc-table").hidden = !select.value;
    if (!select.value) return;
    let c;
    try {
      c = await state.api.json("GET", path(select.value));
    } catch (e) {
      return fail(e, "The documents could not be listed");
    }
    body.replaceChildren(...c.documents.map((d) => h("tr", {},
      h("td", {}, d.source), h("td", {}, d.title), h("td", { class: "number" }, String(d.chunks)),
      h("td", {}, d.groups.length ? d.groups.join(", ") : "everyone"),
      state.me.admin ? h("td", {}, h("button", { type: "button", class: "danger", "aria-label": `Remove ${d.source}`,
        onclick: () => remove(d.source) }, "Remove")) : null)));
    $("#doc-empty").hidden = c.documents.length > 0;
  }

  async function remove(source) {
    const ok = await ask({ title: "Remove document", message: `Remove ${source} from ${select.value}?`,
      confirm: "Remove", danger: true });
    if (!ok) return;
    try {
      await state.api.json("DELETE", `${path(select.value)}/documents/${encodeURIComponent(source)}`);
    } catch (e) {
      return fail(e, `${source} was not removed`);
    }
    await list();
  }

  async function create(e) {
    e.preventDefault();
    const input = $("#new-collection");
    try {
      await state.api.json("POST", "/v1/collections", { name: input.value.trim() });
    } catch (err) {
      return fail(err, "The collection was not created");
    }
    const name = input.value.trim();
    input.value = "";
    await changed();
    fill(name);
    await list();
  }

  /** Upload files one after another, each with its own progress bar and result. */
  async function upload(files) {
    const name = select.value;
    if (!name || !files.length) return;
    // The file travels base64-encoded inside a JSON body: 4 bytes for every 3, plus the other fields.
    const limit = Math.floor((state.me.max_body_bytes - 4096) * 3 / 4);
    const groups = $("#upload-groups").value.split(",").map((g) => g.trim()).filter(Boolean);
    const rows = [...files].map((file) => {
      const bar = h("progress", { max: 100, value: 0, "aria-label": `Upload of ${file.name}` });
      const status = h("span", { class: "status" }, "waiting");
      const row = h("li", {}, h("span", { class: "name" }, file.name), bar, status);
      $("#uploads").append(row);
      return { file, bar, status, row };
    });
    for (const { file, bar, status, row } of rows) {
      const done = (text, ok) => {
        status.textContent = text;
        row.classList.add(ok ? "ok" : "failed");
        if (ok) bar.value = 100;
      };
      const suffix = file.name.slice(file.name.lastIndexOf(".")).toLowerCase();
      if (!SUFFIXES.includes(suffix)) {
        done(`not uploaded: fourwalls reads ${SUFFIXES.join(" ")} files`, false);
        continue;
      }
      if (file.size > limit) {
        done(`not uploaded: ${formatBytes(file.size)} is over this server's upload limit of ${formatBytes(limit)} ` +
          `(--max-body-bytes ${state.me.max_body_bytes})`, false);
        continue;
      }
      status.textContent = "uploading";
      try {
        const body = { source: file.name, content_base64: await base64(file), groups };
        const r = await state.api.upload(`${path(name)}/documents`, body, (f) => {
          bar.value = Math.round(f * 90); // the last tenth: the server reading and indexing it
          if (f === 1) status.textContent = "indexing";
        });
        done(`${r.status}: ${r.chunks} ${r.chunks === 1 ? "chunk" : "chunks"}`, true);
      } catch (e) {
        done(`not uploaded: ${e.message}`, false);
      }
    }
    await changed();
    await list();
  }

  function base64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  select.addEventListener("change", list);
  $("#create-collection").addEventListener("submit", create);
  $("#files").addEventListener("change", async (e) => {
    await upload(e.target.files);
    e.target.value = "";
  });
  const zone = $("#dropzone");
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    upload(e.dataTransfer.files);
  });
  return { open };
}
