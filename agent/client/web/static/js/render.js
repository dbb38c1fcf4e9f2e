// Model output is untrusted text: Markdown (marked) -> HTML sanitized by DOMPurify -> code highlighted by highlight.js.
/* global marked, DOMPurify, hljs */

let configured = false;

function configure() {
  if (configured) return;
  configured = true;
  // Links open in a new tab and cannot reach back into this page.
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });
}

/** Render Markdown into `element`, sanitized, with highlighted code blocks. */
export function renderMarkdown(element, text) {
  configure();
  const html = marked.parse(text, { gfm: true, breaks: true, async: false });
  element.innerHTML = DOMPurify.sanitize(html, {
    USE_PROFILES: { html: true },
    FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"],
    FORBID_ATTR: ["style"],
  });
  for (const block of element.querySelectorAll("pre code")) {
    hljs.highlightElement(block);
    addCopyButton(block.parentElement);
  }
}

function addCopyButton(pre) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy-btn";
  button.textContent = "Copy";
  button.setAttribute("aria-label", "Copy code");
  button.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(pre.querySelector("code").textContent);
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  pre.append(button);
}
