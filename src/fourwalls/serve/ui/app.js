// The web chat: sign-in, the conversation list, one open conversation, and its settings. It uses only the public
// API (api.js): what a key may not do through the API, it may not do here either.

import { Api, ApiError } from "./api.js";
import { setupAdmin } from "./admin.js";
import { chatRequest, editView, messageView, streamAnswer } from "./chat.js";
import { setupDocuments } from "./documents.js";
import { $, ask, download, formatTime, h } from "./dom.js";

const KEY = "fourwalls.key"; // sessionStorage: the key lives as long as the tab, never on disk
const state = {
  api: new Api(sessionStorage.getItem(KEY)),
  me: null, // GET /v1/me: name, admin, groups, max_body_bytes
  models: [],
  collections: [],
  conv: null, // {id, title, settings, messages}
  busy: null, // the AbortController of the answer being streamed
  editing: false,
};

function defaults() {
  return { model: state.models[0]?.id ?? null, system: "", temperature: 0.7, max_tokens: 512, collection: null,
    tools: [] };
}

function blank() {
  return { id: null, title: "", settings: defaults(), messages: [] };
}

// --- sign-in -------------------------------------------------------------------------------------------------

function screen(name) {
  for (const id of ["signin", "fatal", "app"]) $(`#${id}`).hidden = id !== name;
}

async function start() {
  try {
    state.me = await state.api.json("GET", "/v1/me");
  } catch (e) {
    if (e.status === 401) return signIn(state.api.key ? `This key was refused: ${e.message}.` : "");
    $("#fatal-message").textContent = `fourwalls cannot be reached: ${e.message}.`;
    return screen("fatal");
  }
  if (state.api.key) sessionStorage.setItem(KEY, state.api.key);
  $("#who").textContent = state.me.auth ? `Signed in as ${state.me.name}` : "Local user";
  $("#sign-out").hidden = !state.me.auth;
  $("#open-admin").hidden = !state.me.admin;
  await Promise.all([loadModels(), loadCollections()]);
  state.conv = blank();
  screen("app"); // shown once a conversation exists: its buttons act on it
  await Promise.all([loadList(), route()]);
}

function signIn(message) {
  sessionStorage.removeItem(KEY);
  state.api = new Api();
  $("#signin-error").textContent = message;
  screen("signin");
  $("#signin-key").focus();
}

/** What to do with an error of the API: a key no longer accepted goes back to sign-in; anything else is said. */
function fail(e, doing) {
  if (e instanceof ApiError && e.status === 401) return signIn(`Please sign in again: ${e.message}.`);
  notice(`${doing}: ${e.message}`, true);
}

function notice(text, error = false) {
  const el = $("#notice");
  el.textContent = text;
  el.classList.toggle("error", error);
}

// --- models, collections, the conversation list ----------------------------------------------------------------

async function loadModels() {
  try {
    state.models = (await state.api.json("GET", "/v1/models")).data;
  } catch (e) {
    return fail(e, "The models could not be listed");
  }
  $("#model").replaceChildren(...state.models.map((m) => h("option", { value: m.id },
    m.parent ? `${m.id} (adapter of ${m.parent})` : m.id)));
  if (state.conv) showSettings();
}

/** The collections this key may read: an admin sees every one; any other key those with documents it can read. */
async function loadCollections() {
  try {
    const all = (await state.api.json("GET", "/v1/collections")).data;
    state.collections = state.me.admin ? all : all.filter((c) => c.documents > 0);
  } catch (e) {
    state.collections = [];
    return fail(e, "The document collections could not be listed");
  }
  $("#collection").replaceChildren(h("option", { value: "" }, "None"),
    ...state.collections.map((c) => h("option", { value: c.id }, c.id)));
  if (state.conv) showSettings();
}

async function loadList() {
  const q = $("#search").value.trim();
  let found;
  try {
    found = (await state.api.json("GET", `/v1/conversations?q=${encodeURIComponent(q)}`)).data;
  } catch (e) {
    return fail(e, "The conversations could not be listed");
  }
  const current = state.conv?.id;
  $("#conversations").replaceChildren(...found.map((c) => h("li", {},
    h("a", { href: `#c=${c.id}`, "aria-current": c.id === current ? "page" : null },
      h("span", { class: "title" }, c.title || "Untitled"), h("small", {}, formatTime(c.updated))))));
  $("#no-conversations").hidden = found.length > 0;
  $("#no-conversations").textContent = q ? "No conversation matches." : "No conversations yet.";
}

// --- the open conversation -------------------------------------------------------------------------------------

async function route() {
  const id = location.hash.match(/^#c=(conv_[0-9a-f]+)$/)?.[1];
  if (state.busy) { // the answer stops, and is saved in its own conversation
    state.busy.abort();
    state.busy = null;
  }
  state.editing = false;
  if (!id) {
    state.conv = blank();
    return render();
  }
  try {
    const c = await state.api.json("GET", `/v1/conversations/${id}`);
    state.conv = { id: c.id, title: c.title, settings: { ...defaults(), ...c.settings }, messages: c.messages };
  } catch (e) {
    state.conv = blank();
    history.replaceState(null, "", location.pathname);
    fail(e, "That conversation cannot be opened");
  }
  render();
  loadList();
}

function showSettings() {
  const s = state.conv.settings;
  const model = $("#model");
  if (!state.models.some((m) => m.id === s.model)) s.model = state.models[0]?.id ?? null;
  model.value = s.model ?? "";
  const collection = $("#collection");
  collection.value = state.collections.some((c) => c.id === s.collection) ? s.collection : "";
}

function render() {
  const c = state.conv;
  $("#title").textContent = c.title || "New chat";
  document.title = c.title ? `${c.title} · fourwalls` : "fourwalls";
  $("#conversation-menu").hidden = !c.id;
  showSettings();
  renderMessages();
  setBusy(Boolean(state.busy));
}

function renderMessages() {
  const c = state.conv;
  const list = $("#messages");
  const lastUser = c.messages.findLastIndex((m) => m.role === "user");
  const last = c.messages.length - 1;
  const idle = !state.busy;
  list.replaceChildren(...c.messages.map((m, i) => {
    if (state.editing && i === lastUser) return editView(m, resend, () => { state.editing = false; renderMessages(); });
    return messageView(m, {
      label: m.model,
      streaming: !idle && i === last,
      onCitation: showCitation,
      onEdit: idle && i === lastUser ? () => { state.editing = true; renderMessages(); } : null,
      onRegenerate: idle && i === last && m.role === "assistant" ? regenerate : null,
    });
  }));
  $("#empty").hidden = c.messages.length > 0;
  list.scrollTop = list.scrollHeight;
}

function setBusy(busy) {
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
}

async function send(text) {
  const c = state.conv;
  if (state.busy || !text.trim()) return;
  c.messages.push({ role: "user", content: text });
  if (!c.title) c.title = text.trim().split("\n")[0].slice(0, 60);
  $("#prompt").value = "";
  render();
  if (!c.id) {
    try {
      const saved = await state.api.json("POST", "/v1/conversations",
        { title: c.title, settings: c.settings, messages: c.messages });
      c.id = saved.id;
      history.replaceState(null, "", `#c=${c.id}`);
      $("#conversation-menu").hidden = false;
      loadList();
    } catch (e) {
      fail(e, "This conversation is not saved");
    }
  }
  await answer(c);
}

async function answer(c) {
  const message = { role: "assistant", content: "", model: c.settings.model };
  const body = chatRequest(c.settings, c.messages);
  c.messages.push(message);
  const controller = new AbortController();
  state.busy = controller;
  notice("");
  render();
  let frame = 0;
  const update = () => { // once per frame at most, and only the answer: the rest has not changed
    if (frame || state.conv !== c) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      if (state.conv !== c) return;
      const list = $("#messages");
      list.lastElementChild?.replaceWith(messageView(message, { label: message.model, streaming: true }));
      list.scrollTop = list.scrollHeight;
    });
  };
  await streamAnswer(state.api, body, message, update, controller.signal);
  cancelAnimationFrame(frame);
  if (state.busy === controller) state.busy = null;
  if (state.conv === c) render();
  await save(c);
}

async function save(c, fields = { messages: c.messages }) {
  if (!c.id) return;
  try {
    await state.api.json("PATCH", `/v1/conversations/${c.id}`, fields);
    loadList();
  } catch (e) {
    fail(e, "This conversation was not saved");
  }
}

function regenerate() {
  const c = state.conv;
  if (c.messages.at(-1)?.role === "assistant") c.messages.pop();
  answer(c);
}

function resend(text) {
  const c = state.conv;
  state.editing = false;
  c.messages.splice(c.messages.findLastIndex((m) => m.role === "user"));
  c.messages.push({ role: "user", content: text });
  answer(c);
}

function stop() {
  state.busy?.abort();
}

function changeSettings(changes) {
  Object.assign(state.conv.settings, changes);
  save(state.conv, { settings: state.conv.settings });
}

function showCitation(c) {
  $("#citation-title").textContent = c.title || c.source;
  $("#citation-where").textContent = [c.source, c.heading, c.page ? `page ${c.page}` : null]
    .filter(Boolean).join(" · ");
  $("#citation-text").textContent = c.text ?? "(this answer was saved without the quoted text)";
  $("#citation").showModal();
}

// --- conversation actions and settings ----------------------------------------------------------------------

async function rename() {
  const c = state.conv;
  const title = await ask({ title: "Rename conversation", label: "Title", value: c.title, confirm: "Rename" });
  if (title === null || !title.trim()) return;
  c.title = title.trim().slice(0, 200);
  render();
  await save(c, { title: c.title });
}

async function remove() {
  const c = state.conv;
  const ok = await ask({ title: "Delete conversation", message: `Delete “${c.title}” for good?`, confirm: "Delete",
    danger: true });
  if (!ok) return;
  try {
    await state.api.json("DELETE", `/v1/conversations/${c.id}`);
  } catch (e) {
    return fail(e, "The conversation was not deleted");
  }
  location.hash = "";
  await loadList();
}

async function exportAs(format) {
  const c = state.conv;
  try {
    const response = await state.api.request("GET", `/v1/conversations/${c.id}/export?format=${format}`);
    const name = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") ?? "")?.[1];
    download(name ?? `conversation.${format === "markdown" ? "md" : "json"}`, await response.blob());
  } catch (e) {
    fail(e, "The export failed");
  }
}

function openSettings() {
  const s = state.conv.settings;
  $("#system").value = s.system;
  $("#temperature").value = s.temperature;
  $("#max-tokens").value = s.max_tokens ?? "";
  for (const box of document.querySelectorAll("#settings .tools input")) box.checked = s.tools?.includes(box.value);
  $("#settings").showModal();
}

function saveSettings(e) {
  if (e.submitter?.value !== "save") return;
  const max = $("#max-tokens").value;
  changeSettings({ system: $("#system").value, temperature: Number($("#temperature").value),
    max_tokens: max ? Number(max) : null,
    tools: [...document.querySelectorAll("#settings .tools input:checked")].map((box) => box.value) });
}

// --- wiring ----------------------------------------------------------------------------------------------------

function wire() {
  $("#signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.api = new Api($("#signin-key").value.trim());
    $("#signin-key").value = "";
    start();
  });
  $("#retry").addEventListener("click", start);
  $("#sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    location.hash = "";
    location.reload();
  });
  $("#composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send($("#prompt").value);
  });
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send($("#prompt").value);
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || document.querySelector("dialog[open]")) return;
    if (state.busy) {
      e.preventDefault();
      stop();
    } else {
      toggleSidebar(false);
    }
  });
  $("#scrim").addEventListener("click", () => toggleSidebar(false));
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", () => {
    if (location.hash) location.hash = "";
    else route();
    $("#prompt").focus();
    toggleSidebar(false);
  });
  window.addEventListener("hashchange", () => {
    if (location.hash !== `#c=${state.conv?.id}`) route();
    toggleSidebar(false);
  });
  let searching = 0;
  $("#search").addEventListener("input", () => {
    clearTimeout(searching);
    searching = setTimeout(loadList, 200);
  });
  $("#model").addEventListener("change", (e) => changeSettings({ model: e.target.value }));
  $("#collection").addEventListener("change", (e) => changeSettings({ collection: e.target.value || null }));
  $("#open-settings").addEventListener("click", openSettings);
  $("#settings-form").addEventListener("submit", saveSettings);
  $("#rename").addEventListener("click", rename);
  $("#delete").addEventListener("click", remove);
  $("#export-json").addEventListener("click", () => exportAs("json"));
  $("#export-md").addEventListener("click", () => exportAs("markdown"));
  $("#toggle-sidebar").addEventListener("click", () => toggleSidebar());
  const documents = setupDocuments(state, { changed: loadCollections, fail });
  $("#open-documents").addEventListener("click", documents.open);
  const admin = setupAdmin(state, { changed: () => Promise.all([loadModels(), loadCollections()]), fail });
  $("#open-admin").addEventListener("click", admin.open);
  for (const menu of document.querySelectorAll("details.menu")) {
    menu.addEventListener("click", (e) => { if (e.target.closest("button")) menu.open = false; });
  }
}

function toggleSidebar(show = undefined) {
  const open = show ?? !document.body.classList.contains("sidebar-open");
  document.body.classList.toggle("sidebar-open", open);
  $("#toggle-sidebar").setAttribute("aria-expanded", String(open));
}

wire();
start();
