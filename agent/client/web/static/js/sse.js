// Server-sent events read from a fetch() body: /chat streams over POST, which EventSource cannot send.

/**
 * Split an SSE byte stream into the JSON payloads of its `data:` fields.
 * Events may arrive cut anywhere (mid-line, mid-UTF-8 character); a blank line ends an event.
 * @param {ReadableStream<Uint8Array>} body
 * @returns {AsyncGenerator<any>} each event's parsed data (the literal `[DONE]` ends the stream)
 */
export async function* readSse(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const events = buffer.split(/\r?\n\r?\n/);
      buffer = done ? "" : events.pop();
      for (const event of events) {
        const data = eventData(event);
        if (data === null) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
      if (done) return;
    }
  } finally {
    reader.releaseLock();
  }
}

/** The joined `data:` lines of one event, or null for comments / keep-alives / other fields only. */
export function eventData(event) {
  const lines = [];
  for (const line of event.split(/\r?\n/)) {
    if (line.startsWith("data:")) lines.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return lines.length ? lines.join("\n") : null;
}
