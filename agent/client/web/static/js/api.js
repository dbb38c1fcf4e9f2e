// The server's HTTP API (docs/api.md), wrapped so that every failure becomes an ApiError with a readable message.
import { readSse } from "./sse.js";

/** An error answered by the server (status + code from its error table) or a network failure (status 0). */
export class ApiError extends Error {
  constructor(message, status = 0, code = "network_error") {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
  }
}

const STATUS_TEXT = {
  400: "Invalid request",
  404: "Not found",
  413: "Too large",
  422: "Invalid value",
  429: "Server busy",
  500: "Server error",
  503: "Model not ready",
};

/** Build an ApiError from the `{"error": {...}}` body of a failed response (or its status alone). */
async function errorFrom(response) {
  let message = "";
  let code = "http_error";
  try {
    const body = await response.json();
    const err = body && body.error;
    if (err && typeof err === "object") {
      message = err.message || "";
      code = err.type || code;
    } else if (body && body.detail) {
      // FastAPI's own validation errors carry `detail` (a string or a list of issues).
      message = typeof body.detail === "string" ? body.detail : body.detail.map((d) => d.msg).join("; ");
    }
  } catch {
    // Not JSON (e.g. a proxy's HTML page): the status line is all we have.
  }
  const title = STATUS_TEXT[response.status] || `HTTP ${response.status}`;
  const retry = response.headers.get("Retry-After");
  const suffix = retry ? ` (retry in ${retry} s)` : "";
  return new ApiError(`${title} (${response.status})${message ? ": " + message : ""}${suffix}`, response.status, code);
}

async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: { Accept: "application/json", ...(options.body ? { "Content-Type": "application/json" } : {}) },
    });
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    throw new ApiError("Cannot reach the server — is it running?");
  }
  if (!response.ok) throw await errorFrom(response);
  return response;
}

async function json(path, options) {
  return (await request(path, options)).json();
}

/** GET /health: `{status: "ready", model, running, ...}`; a 503 resolves to its body (`loading`, `failed` + `error`). */
export async function getHealth() {
  let response;
  try {
    response = await fetch("health", { headers: { Accept: "application/json" } });
  } catch {
    throw new ApiError("Cannot reach the server — is it running?");
  }
  if (response.status === 503) return response.json().catch(() => ({ status: "loading" }));
  if (!response.ok) throw await errorFrom(response);
  return response.json();
}

export const listSessions = async () => (await json("sessions")).sessions;
/** GET /me: `{name, role, max_concurrent, tokens_per_minute}` of the caller (its API key's principal). */
export const getMe = () => json("me");
export const createSession = async () => (await json("sessions", { method: "POST" })).session_id;
export const deleteSession = (id) => request(`sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
export const getHistory = async (id) => (await json(`history?session_id=${encodeURIComponent(id)}`)).history;
export const clearHistory = (id) =>
  request("clear_history", { method: "POST", body: JSON.stringify({ session_id: id }) });

/**
 * POST /chat with `stream: true`; yields `{delta}` events, then one `{done: true, ...}`.
 * An `{error}` event (the server failed after the stream started) is thrown as an ApiError.
 * Aborting `signal` cancels the fetch; the server then aborts the engine request.
 */
export async function* streamChat({ message, imageBase64, sessionId }, signal) {
  const body = JSON.stringify({ message, image_base64: imageBase64 || null, session_id: sessionId, stream: true });
  const response = await request("chat", { method: "POST", body, signal });
  for await (const event of readSse(response.body)) {
    if (event.error) {
      const err = event.error;
      throw new ApiError(`${STATUS_TEXT[err.code] || "Error"}: ${err.message}`, err.code || 500, err.type);
    }
    yield event;
  }
}
