// Talking to switchd: the API key, authorised fetches, and Server-Sent Events
// read with fetch (EventSource cannot send an Authorization header).

const KEY_STORAGE = "switchd.apiKey";

export class Unauthorized extends Error {}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function saveApiKey(key) {
  localStorage.setItem(KEY_STORAGE, key);
}

export async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized("the server wants an API key");
  return response;
}

// Yields {event, id, data} for each event of a text/event-stream body.
// Leaving the loop early (break, return) closes the connection.
export async function* readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { event: "message", id: null, data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r?\n/)) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(buffer[newline] === "\r" ? newline + 2 : newline + 1);
        if (line === "") {
          if (event.data.length) yield { event: event.event, id: event.id, data: event.data.join("\n") };
          event = { event: "message", id: null, data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") event.event = text;
          else if (field === "id") event.id = text;
          else if (field === "data") event.data.push(text);
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // already closed or failed: nothing to release
  }
}

// The first event of an event-stream response, or null; the stream is closed after it.
export async function firstEvent(response) {
  for await (const message of readEvents(response)) return message;
  return null;
}
