// One conversation's messages: the chat completion request they make, an answer streamed into them, and how
// each is shown (Markdown, sources, tool calls, token counts and speed).

import { h } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const KEPT = ["name", "tool_calls", "tool_call_id"]; // OpenAI message fields sent back with the history

/** The chat completion request for a conversation's settings and messages. */
export function chatRequest(settings, messages) {
  const history = messages
    .filter((m) => m.content || m.tool_calls)
    .map((m) => {
      const out = { role: m.role, content: m.content ?? "" };
      for (const k of KEPT) if (m[k] !== undefined) out[k] = m[k];
      return out;
    });
  if (settings.system) history.unshift({ role: "system", content: settings.system });
  const body = {
    model: settings.model, messages: history, temperature: settings.temperature, stream: true,
    stream_options: { include_usage: true },
  };
  if (settings.max_tokens) body.max_tokens = settings.max_tokens;
  if (settings.collection) body.rag = { collection: settings.collection };
  if (settings.tools?.length) body.tools = settings.tools.map((name) => ({ type: "fourwalls", name }));
  return body;
}

/** Stream an answer into `message` (an assistant message), calling `update()` as it grows. Stopping (the
 * signal) or an error keeps what arrived: `message.stopped`, or `message.error` with the reason. */
export async function streamAnswer(api, body, message, update, signal) {
  const start = performance.now();
  let first = null;
  let last = null;
  let chunks = 0;
  try {
    for await (const event of api.stream("/v1/chat/completions", body, signal)) {
      if (event.error) throw new Error(event.error.message);
      if (event.citations) message.citations = event.citations;
      if (event.tool_round) (message.tool_rounds ??= []).push(event.tool_round);
      const choice = event.choices?.[0];
      if (choice?.delta?.content) {
        message.content += choice.delta.content;
        chunks += 1;
        last = performance.now();
        first ??= last;
      }
      if (choice?.delta?.tool_calls) mergeToolCalls(message, choice.delta.tool_calls);
      if (choice?.finish_reason) message.finish_reason = choice.finish_reason;
      if (event.usage) message.usage = event.usage;
      update();
    }
  } catch (e) {
    if (signal.aborted) message.stopped = true;
    else message.error = e.message;
  }
  message.timings = {
    ttft_ms: first === null ? null : Math.round(first - start),
    decode_ms: first === null ? null : Math.round(last - first),
    chunks,
  };
  const cited = new Set([...message.content.matchAll(/\[(\d+)\]/g)].map((x) => Number(x[1])));
  for (const c of message.citations ?? []) c.cited = cited.has(c.index);
}

function mergeToolCalls(message, deltas) {
  message.tool_calls ??= [];
  for (const d of deltas) {
    message.tool_calls[d.index ?? 0] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
    const call = message.tool_calls[d.index ?? 0];
    if (d.id) call.id = d.id;
    if (d.function?.name) call.function.name += d.function.name;
    if (d.function?.arguments) call.function.arguments += d.function.arguments;
  }
}

/** "12 tokens · 31.0 tokens/s · first token 0.21 s · prompt 130 tokens (96 cached)"; counts are the server's
 * when it sent them (a stopped answer has none: its pieces are counted instead). */
export function stats(m) {
  const parts = [];
  const u = m.usage;
  const t = m.timings ?? {};
  const n = u ? u.completion_tokens : t.chunks;
  if (n) parts.push(`${u ? "" : "≈"}${n} tokens`);
  if (n > 1 && t.decode_ms > 0) parts.push(`${((n - 1) / (t.decode_ms / 1000)).toFixed(1)} tokens/s`);
  if (t.ttft_ms !== null && t.ttft_ms !== undefined) parts.push(`first token ${(t.ttft_ms / 1000).toFixed(2)} s`);
  if (u) {
    const cached = u.prompt_tokens_details?.cached_tokens;
    parts.push(`prompt ${u.prompt_tokens} tokens${cached ? ` (${cached} cached)` : ""}`);
  }
  if (m.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function citationLabel(c) {
  return [`[${c.index}] ${c.source}`, c.heading, c.page ? `page ${c.page}` : null].filter(Boolean).join(" · ");
}

/** A round of built-in tools the server ran: each call with its result. */
function toolRoundView(round) {
  return round.tool_calls.map((call, i) => h("details", { class: "tool ran" },
    h("summary", {}, `Ran ${call.function.name}: ${call.function.arguments}`),
    h("pre", {}, round.results[i]?.content ?? "")));
}

function toolCallView(call) {
  return h("details", { class: "tool" },
    h("summary", {}, `Tool call: ${call.function?.name ?? "?"}`),
    h("pre", {}, call.function?.arguments ?? ""));
}

const ROLES = { user: "You", system: "System", developer: "System", tool: "Tool result" };

/** A message as shown. `actions`: {label, streaming, onEdit, onRegenerate, onCitation}; an action is offered
 * when its handler is given. */
export function messageView(m, actions = {}) {
  const content = h("div", { class: "content" });
  if (m.role === "assistant") renderMarkdown(content, m.content ?? "");
  else if (m.role === "tool") content.append(h("pre", {}, m.content ?? ""));
  else content.textContent = m.content ?? "";
  const role = m.role === "assistant" ? (actions.label ?? "Assistant") : (ROLES[m.role] ?? m.role);
  const el = h("article", { class: `message ${m.role}`, "aria-busy": actions.streaming ? "true" : null },
    h("div", { class: "role" }, role), content);
  if (m.role === "tool" && m.tool_call_id) el.querySelector(".role").append(` (${m.tool_call_id})`);
  if (m.tool_rounds?.length) content.before(...m.tool_rounds.flatMap(toolRoundView));
  if (m.tool_calls?.length) el.append(...m.tool_calls.map(toolCallView));
  if (m.citations?.length) {
    el.append(h("ol", { class: "citations", "aria-label": "Sources" }, m.citations.map((c) => h("li", {},
      h("button", { type: "button", class: c.cited ? "citation cited" : "citation",
        onclick: () => actions.onCitation?.(c) }, citationLabel(c))))));
  }
  if (actions.streaming && !m.content) content.append(h("span", { class: "typing", "aria-label": "Answering" }));
  if (m.error) {
    el.append(h("p", { class: "error", role: "alert" }, `The answer stopped: ${m.error}. What arrived is kept.`));
  }
  const line = m.role === "assistant" && !actions.streaming ? stats(m) : "";
  const buttons = [];
  if (actions.onEdit) buttons.push(h("button", { type: "button", onclick: actions.onEdit }, "Edit"));
  if (actions.onRegenerate) buttons.push(h("button", { type: "button", onclick: actions.onRegenerate }, "Regenerate"));
  if (line || buttons.length) el.append(h("div", { class: "meta" }, h("span", { class: "stats" }, line), ...buttons));
  return el;
}

/** The last user message, editable: resolves with the new text (null: cancelled). */
export function editView(m, onSend, onCancel) {
  const area = h("textarea", { "aria-label": "Edit your message", rows: 3 });
  area.value = m.content ?? "";
  const form = h("form", { class: "message user editing" }, h("div", { class: "role" }, "You (editing)"), area,
    h("div", { class: "meta" },
      h("button", { type: "submit" }, "Send"),
      h("button", { type: "button", onclick: onCancel }, "Cancel")));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (area.value.trim()) onSend(area.value);
  });
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      form.requestSubmit();
    } else if (e.key === "Escape") {
      e.preventDefault();
      onCancel();
    }
  });
  queueMicrotask(() => area.focus());
  return form;
}
