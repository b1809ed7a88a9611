// Model answers as Markdown (marked), made safe (DOMPurify): HTML written in an answer or a document shows as
// the text it is, images are not fetched (a link instead), and whatever HTML marked makes is sanitized before it
// reaches the page. The page's Content-Security-Policy forbids inline scripts as a last line besides.

import { Marked } from "./vendor/marked.esm.js";
import DOMPurify from "./vendor/purify.es.js";
import { h } from "./dom.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
const escape = (text) => text.replace(/[&<>"']/g, (c) => ESCAPES[c]);

const marked = new Marked({
  gfm: true,
  renderer: {
    html: ({ text }) => escape(text), // raw HTML in the Markdown: shown, never parsed
    // An image would be fetched as the page shows it, telling its server what was asked: a link to click instead.
    image: ({ href, text }) => `<a href="${escape(href)}">${escape(text || href)}</a>`,
  },
});

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer");
  }
});

/** Render Markdown into `el`, with a copy button on each code block. */
export function renderMarkdown(el, text) {
  el.innerHTML = DOMPurify.sanitize(marked.parse(text), {
    FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select"],
    FORBID_ATTR: ["style"],
  });
  for (const pre of el.querySelectorAll("pre")) {
    const code = pre.querySelector("code") ?? pre;
    const button = h("button", { type: "button", class: "copy", "aria-label": "Copy code" }, "Copy");
    button.addEventListener("click", async () => {
      button.textContent = (await copy(code.textContent)) ? "Copied" : "Copy failed";
      setTimeout(() => { button.textContent = "Copy"; }, 1500);
    });
    pre.prepend(button);
  }
}

/** Copy text to the clipboard: the Clipboard API where the page may use it (localhost, HTTPS), else the old way. */
export async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = h("textarea", { "aria-hidden": "true", class: "offscreen" });
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}
