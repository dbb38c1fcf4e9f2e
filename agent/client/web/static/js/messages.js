// The conversation pane: one <article> per message; the assistant's text is rendered as sanitized Markdown.
import { renderMarkdown } from "./render.js";

const pane = () => document.getElementById("messages");

/** A message bubble. `body` holds its text, `meta` its footer (response time, errors). */
export class MessageView {
  constructor(role, { text = "", hasImage = false, imageUrl = null } = {}) {
    this.role = role;
    this.text = text;
    this.article = document.createElement("article");
    this.article.className = `msg msg-${role}`;
    this.article.dataset.role = role;
    this.article.setAttribute("aria-label", role === "user" ? "Your message" : "Assistant message");
    if (imageUrl || hasImage) this.article.append(imageNode(imageUrl));
    this.body = document.createElement("div");
    this.body.className = role === "user" ? "msg-body plain" : "msg-body markdown";
    this.meta = document.createElement("footer");
    this.meta.className = "msg-meta";
    this.article.append(this.body, this.meta);
    this.setText(text);
    pane().append(this.article);
    document.getElementById("empty-hint").hidden = true;
  }

  /** Replace the text; user text stays plain (never parsed as HTML), assistant text is Markdown. */
  setText(text) {
    this.text = text;
    if (this.role === "user") this.body.textContent = text;
    else renderMarkdown(this.body, text);
  }

  setPending(pending) {
    this.article.classList.toggle("pending", pending);
    this.article.setAttribute("aria-busy", String(pending));
  }

  setMeta(text, { error = false } = {}) {
    this.meta.textContent = text;
    this.meta.classList.toggle("error", error);
  }
}

function imageNode(url) {
  if (!url) {
    const tag = document.createElement("span");
    tag.className = "image-tag";
    tag.textContent = "[image attached]";
    return tag;
  }
  const img = document.createElement("img");
  img.className = "msg-image";
  img.src = url;
  img.alt = "Image you sent";
  return img;
}

/** Show a session's stored history (from GET /history). */
export function showHistory(history) {
  clearMessages();
  for (const turn of history) new MessageView(turn.role, { text: turn.content, hasImage: turn.has_image });
  scrollToEnd(true);
}

export function clearMessages() {
  pane().replaceChildren();
  document.getElementById("empty-hint").hidden = false;
}

/** Follow the stream only while the reader is already at the bottom (don't yank them back while they scroll up). */
export function scrollToEnd(force = false) {
  const el = pane();
  const nearBottom = el.scrollHeight - el.scrollTop - el.clientHeight < 80;
  if (force || nearBottom) el.scrollTop = el.scrollHeight;
}
