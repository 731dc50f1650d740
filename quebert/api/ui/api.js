// The console's link to the HTTP API: the token, requests, the event stream.
//
// The token lives in sessionStorage (this tab only) and travels in the
// Authorization header, never in a URL and never in a cookie, so there is
// nothing for another site to forge a request with.  Every URL is relative
// to the page (served at <api>/ui/), so the console works wherever the API
// is mounted.

const KEY = "quebert.console.token";
const BASE = new URL("../", window.location.href);

export class Unauthorized extends Error {}

export function token() {
  return window.sessionStorage.getItem(KEY);
}

export function setToken(value) {
  window.sessionStorage.setItem(KEY, value);
}

export function forgetToken() {
  window.sessionStorage.removeItem(KEY);
}

function headers(extra) {
  const h = new Headers(extra || {});
  const t = token();
  if (t) h.set("Authorization", "Bearer " + t);
  return h;
}

// One API call; resolves with the decoded JSON body, rejects with an Error
// whose message is the API's own (its "error.message").
export async function call(method, path, body) {
  const init = {method, headers: headers(), cache: "no-store", credentials: "omit"};
  if (body !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(body);
  }
  const response = await fetch(new URL(path, BASE), init);
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (response.status === 401) throw new Unauthorized(messageOf(data, "token refused"));
  if (!response.ok) {
    const error = new Error(messageOf(data, "HTTP " + response.status));
    error.status = response.status;
    throw error;
  }
  return data;
}

function messageOf(data, fallback) {
  if (data && data.error && typeof data.error.message === "string") return data.error.message;
  return fallback;
}

// The server-sent events of GET /events, read with fetch (EventSource cannot
// send a header).  handlers: {hello(data), overview(data), problem(data),
// state(live: bool, why), unauthorized()}.  Reconnects after a loss, backing
// off from 0.5 s to 5 s, until close() is called.
export function stream(handlers) {
  let closed = false;
  let controller = null;
  let delay = 500;

  async function run() {
    while (!closed) {
      controller = new AbortController();
      try {
        const response = await fetch(new URL("events", BASE), {
          headers: headers(), cache: "no-store", credentials: "omit",
          signal: controller.signal,
        });
        if (response.status === 401) {
          handlers.state(false, "token refused");
          handlers.unauthorized();
          return;
        }
        if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
        delay = 500;
        handlers.state(true, "live");
        await read(response.body, handlers);
        if (!closed) handlers.state(false, "reconnecting");
      } catch (e) {
        if (closed) return;
        handlers.state(false, "reconnecting");
      }
      await new Promise((resolve) => window.setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 5000);
    }
  }

  run();
  return {
    close() {
      closed = true;
      if (controller) controller.abort();
    },
  };
}

async function read(body, handlers) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      dispatch(block, handlers);
    }
  }
}

function dispatch(block, handlers) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) name = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
  }
  if (!data.length || typeof handlers[name] !== "function") return;
  let parsed;
  try {
    parsed = JSON.parse(data.join("\n"));
  } catch (e) {
    return;
  }
  handlers[name](parsed);
}
