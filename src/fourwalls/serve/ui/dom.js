// Small DOM helpers. Every string from the server or a model goes into the page as text, never as HTML: the one
// place that turns text into HTML is markdown.js, which sanitizes what it makes.

export const $ = (selector) => document.querySelector(selector);

/** An element: h("button", {class: "x", onclick: f}, "text", child). Props starting with "on" add listeners. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

/** Ask in the page's own dialog: a question (confirm) or, with `value`, a line of text. Resolves to the text,
 * true, or null when cancelled. */
export function ask({ title, message = "", value = null, label = "", confirm = "OK", danger = false }) {
  const dialog = $("#ask");
  $("#ask-title").textContent = title;
  $("#ask-message").textContent = message;
  const field = $("#ask-field");
  field.hidden = value === null;
  $("#ask-label").textContent = label;
  const input = $("#ask-input");
  input.value = value ?? "";
  const ok = $("#ask-ok");
  ok.textContent = confirm;
  ok.classList.toggle("danger", danger);
  dialog.returnValue = "";
  dialog.showModal();
  if (value !== null) input.select();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      if (dialog.returnValue !== "ok") resolve(null);
      else resolve(value === null ? true : input.value);
    }, { once: true });
  });
}

export function formatBytes(n) {
  if (n < 1000) return `${n} B`;
  if (n < 1e6) return `${(n / 1e3).toFixed(n < 1e4 ? 1 : 0)} kB`;
  return `${(n / 1e6).toFixed(1)} MB`;
}

export function formatTime(seconds) {
  const d = new Date(seconds * 1000);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : d.toLocaleDateString();
}

/** Save a blob as a file through the browser's own download. */
export function download(name, blob) {
  const a = h("a", { href: URL.createObjectURL(blob), download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
}
