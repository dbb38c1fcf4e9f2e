// The chat page: model status, sessions, the composer (text + image), streaming answers and stop.
import * as api from "./api.js";
import { DEFAULT_MAX_IMAGE_BYTES, formatBytes, imageFromTransfer, readImage } from "./image.js";
import { clearMessages, MessageView, scrollToEnd, showHistory } from "./messages.js";
import { pollHealth, refreshHealth } from "./status.js";
import { initTheme } from "./theme.js";

const $ = (id) => document.getElementById(id);
// The last open chat, per principal: two people sharing a browser (after /logout, /login) each reopen their own.
// The local operator (no keys) keeps the original key.
let SESSION_KEY = "newbie-app.session";
const IDLE_HINT = "Enter to send · Shift+Enter for a new line";

const state = {
  sessionId: null,
  health: null, // last /health answer
  image: null, // {dataUrl, name, size} attached to the next message
  controller: null, // AbortController of the answer being streamed
  switching: false, // a chat's history is loading: sending now would mix two chats on screen
  sessionsVersion: 0, // drops stale /sessions answers when several refreshes overlap
};

// ---------------------------------------------------------------- errors
function showError(message) {
  $("error-text").textContent = message;
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-text").textContent = "";
}

/** Run an action; any failure is shown to the learner (never swallowed) and logged for developers. */
async function guarded(action) {
  try {
    return await action();
  } catch (exc) {
    console.error(exc);
    showError(exc.message || String(exc));
    return undefined;
  }
}

// ---------------------------------------------------------------- model status
function supportsImages() {
  return Boolean(state.health?.model?.supports_images);
}

function maxImageBytes() {
  return state.health?.limits?.max_image_bytes || DEFAULT_MAX_IMAGE_BYTES;
}

// ---------------------------------------------------------------- sessions
function sessionItem(session) {
  const li = document.createElement("li");
  li.className = "session";
  const open = document.createElement("button");
  open.type = "button";
  open.className = "session-open";
  open.textContent = session.title || "New chat";
  open.title = session.title || "New chat";
  if (session.session_id === state.sessionId) open.setAttribute("aria-current", "true");
  open.addEventListener("click", () => guarded(() => selectSession(session.session_id)));
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "icon-btn session-delete";
  remove.textContent = "✕";
  remove.setAttribute("aria-label", `Delete chat: ${session.title || "New chat"}`);
  remove.addEventListener("click", () => guarded(() => removeSession(session.session_id)));
  li.append(open, remove);
  return li;
}

async function refreshSessions() {
  const version = ++state.sessionsVersion;
  const sessions = await api.listSessions();
  if (version !== state.sessionsVersion) return sessions;
  // The open chat stays listed even before its first message (the server may list only sessions with turns).
  if (state.sessionId && !sessions.some((s) => s.session_id === state.sessionId)) {
    sessions.unshift({ session_id: state.sessionId, title: "", turns: 0 });
  }
  $("session-list").replaceChildren(...sessions.map(sessionItem));
  return sessions;
}

async function selectSession(id) {
  if (state.controller) throw new Error("Stop the current answer before switching chats.");
  state.sessionId = id;
  localStorage.setItem(SESSION_KEY, id);
  clearError();
  closeDrawer();
  for (const button of document.querySelectorAll(".session-open")) button.removeAttribute("aria-current");
  state.switching = true;
  try {
    showHistory(await api.getHistory(id));
  } finally {
    state.switching = false;
  }
  await refreshSessions();
}

async function newChat() {
  await selectSession(await api.createSession());
  $("input").focus();
}

async function removeSession(id) {
  await api.deleteSession(id);
  if (id !== state.sessionId) {
    await refreshSessions();
    return;
  }
  const rest = (await api.listSessions()).filter((s) => s.session_id !== id);
  await selectSession(rest.length ? rest[0].session_id : await api.createSession());
}

async function clearChat() {
  await api.clearHistory(state.sessionId);
  clearMessages();
  await refreshSessions();
}

async function initSessions() {
  const me = await api.getMe().catch(() => null);
  if (me && me.name !== "local") SESSION_KEY = `newbie-app.session.${me.name}`;
  // The server lists only this caller's sessions (another principal's answer 404), so a saved id of someone else's
  // chat is simply not found below.
  const saved = localStorage.getItem(SESSION_KEY);
  const sessions = await api.listSessions();
  const known = sessions.find((s) => s.session_id === saved);
  const id = known ? saved : sessions.length ? sessions[0].session_id : await api.createSession();
  await selectSession(id);
}

// ---------------------------------------------------------------- phone drawer
function openDrawer() {
  document.body.classList.add("drawer-open");
  $("scrim").hidden = false;
  $("sessions-toggle").setAttribute("aria-expanded", "true");
}

function closeDrawer() {
  document.body.classList.remove("drawer-open");
  $("scrim").hidden = true;
  $("sessions-toggle").setAttribute("aria-expanded", "false");
}

// ---------------------------------------------------------------- image attachment
async function attach(file) {
  if (!file) return;
  if (state.health?.status === "ready" && !supportsImages()) {
    showError(`${state.health.model.model_name} cannot see images; ask in words, or load a vision model.`);
    return;
  }
  const image = await readImage(file, maxImageBytes());
  state.image = image;
  $("attachment-img").src = image.dataUrl;
  $("attachment-info").textContent = `${image.name} · ${formatBytes(image.size)}`;
  $("attachment").hidden = false;
  clearError();
}

function detach() {
  state.image = null;
  $("attachment").hidden = true;
  $("attachment-img").removeAttribute("src");
  $("file-input").value = "";
}

function initAttachments() {
  $("file-input").addEventListener("change", (e) => guarded(() => attach(e.target.files[0])));
  $("attachment-remove").addEventListener("click", detach);
  document.addEventListener("paste", (e) => {
    const file = imageFromTransfer(e.clipboardData);
    if (!file) return; // plain text paste goes to the textarea as usual
    e.preventDefault();
    guarded(() => attach(file));
  });
  const overlay = $("drop-overlay");
  let depth = 0; // dragenter/leave fire for every child element crossed
  const hasFiles = (e) => [...(e.dataTransfer?.types || [])].includes("Files");
  document.addEventListener("dragenter", (e) => {
    if (!hasFiles(e)) return;
    depth += 1;
    overlay.hidden = false;
  });
  document.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) overlay.hidden = true;
  });
  document.addEventListener("dragover", (e) => {
    if (hasFiles(e)) e.preventDefault(); // allows the drop
  });
  document.addEventListener("drop", (e) => {
    depth = 0;
    overlay.hidden = true;
    if (!hasFiles(e)) return;
    e.preventDefault();
    guarded(() => attach(imageFromTransfer(e.dataTransfer)));
  });
}

// ---------------------------------------------------------------- sending and streaming
function setStreaming(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("composer").classList.toggle("busy", on);
  $("hint").textContent = on ? "Generating… press Stop or Esc to cancel" : IDLE_HINT;
}

function describeDone(event, seconds) {
  const time = `${(event.response_time ?? seconds).toFixed(1)} s`;
  const tokens = event.usage?.completion_tokens;
  const parts = [time];
  if (tokens !== undefined) parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  if (event.finish_reason === "length") parts.push("cut at the token limit");
  return parts.join(" · ");
}

async function send() {
  if (state.controller || state.switching) return;
  const input = $("input");
  const message = input.value.trim();
  if (!message && !state.image) return;
  clearError();
  const image = state.image;
  new MessageView("user", { text: message, imageUrl: image?.dataUrl });
  input.value = "";
  autosize();
  detach();
  const answer = new MessageView("assistant");
  answer.setPending(true);
  scrollToEnd(true);

  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  let text = "";
  let frame = 0; // re-render Markdown at most once per animation frame, not once per token
  try {
    const request = { message, imageBase64: image?.dataUrl, sessionId: state.sessionId };
    for await (const event of api.streamChat(request, controller.signal)) {
      if (!text && event.delta) refreshHealth(); // first token: the status shows the answer running
      if (event.delta) {
        text += event.delta;
        frame ||= requestAnimationFrame(() => {
          frame = 0;
          answer.setText(text);
          scrollToEnd();
        });
      }
      if (event.done) {
        text = event.response ?? text;
        answer.setMeta(describeDone(event, elapsed()));
      }
    }
    cancelAnimationFrame(frame);
    answer.setText(text);
  } catch (exc) {
    cancelAnimationFrame(frame);
    answer.setText(text);
    if (exc.name === "AbortError") {
      answer.setMeta(`Stopped after ${elapsed().toFixed(1)} s`);
    } else {
      console.error(exc);
      answer.setMeta(`Failed after ${elapsed().toFixed(1)} s`, { error: true });
      showError(exc.message || String(exc));
    }
  } finally {
    answer.setPending(false);
    state.controller = null;
    setStreaming(false);
    scrollToEnd();
    guarded(refreshSessions); // the first message gives a new chat its title
    refreshHealth(); // the running count changed
  }
}

function stop() {
  state.controller?.abort();
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
}

function initComposer() {
  const input = $("input");
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  input.addEventListener("keydown", (e) => {
    // Enter sends, Shift+Enter is a new line; never send mid-composition (IME input for CJK languages).
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  input.addEventListener("input", autosize);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) stop();
  });
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", () => guarded(clearChat));
  $("new-chat").addEventListener("click", () => guarded(newChat));
  $("error-close").addEventListener("click", clearError);
  $("sessions-toggle").addEventListener("click", openDrawer);
  $("scrim").addEventListener("click", closeDrawer);
}

// ---------------------------------------------------------------- start
function main() {
  initTheme();
  setStreaming(false);
  initComposer();
  initAttachments();
  pollHealth((health) => (state.health = health));
  guarded(initSessions).then(() => document.body.classList.add("ready"));
}

// Modules run after the deferred vendor scripts, so marked / DOMPurify / hljs are defined here.
main();
