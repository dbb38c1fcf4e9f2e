// The model status in the top bar (loading / ready / failed, name, vision or text only) and the attach button's state.
import * as api from "./api.js";

const $ = (id) => document.getElementById(id);

function showStatus(health, failure) {
  const box = $("model-status");
  const badge = $("model-vision");
  if (failure) {
    box.dataset.state = "error";
    $("model-status-text").textContent = "Server unreachable";
    badge.hidden = true;
    return;
  }
  if (health.status !== "ready") {
    const failed = health.status === "failed";
    box.dataset.state = failed ? "error" : "loading";
    $("model-status-text").textContent = failed ? "Model failed to load" : "Loading model…";
    box.title = health.error || "";
    badge.hidden = true;
    return;
  }
  const model = health.model || {};
  box.dataset.state = "ready";
  const running = health.running ? ` · ${health.running} running` : "";
  $("model-status-text").textContent = `${model.model_name || "model"} · ready${running}`;
  box.title = `engine ${model.engine || health.engine || "?"} on ${model.device || "?"}`;
  badge.hidden = false;
  badge.textContent = model.supports_images ? "vision" : "text only";
  badge.dataset.vision = String(Boolean(model.supports_images));
  const attach = $("attach-label");
  attach.classList.toggle("disabled", !model.supports_images);
  $("file-input").disabled = !model.supports_images;
  attach.title = model.supports_images
    ? "Attach an image (or paste / drop one)"
    : `${model.model_name} cannot see images: load a vision model (e.g. Qwen3-VL) to send screenshots`;
}

let timer = 0;
let listener = () => {};

/**
 * Poll /health: often while the model loads or the server is away, rarely once ready; `onHealth` gets each answer.
 * Call `refreshHealth()` when something changed (an answer started or ended) to update the status at once.
 */
export function pollHealth(onHealth) {
  listener = onHealth;
  refreshHealth();
}

export async function refreshHealth() {
  clearTimeout(timer);
  let delay = 10_000;
  try {
    const health = await api.getHealth();
    listener(health);
    showStatus(health, false);
    if (health.status !== "ready" || health.running) delay = 2_000; // loading, or answers being generated
  } catch (exc) {
    showStatus(null, exc);
    delay = 3_000;
  }
  clearTimeout(timer); // a refresh may have finished meanwhile: keep a single timer
  timer = setTimeout(refreshHealth, delay);
}
