// Server-Sent Events over fetch(). EventSource cannot send an Authorization header, so this reads the
// text/event-stream body itself, sends the bearer token as a header, and on every reconnect sends the
// last message id as Last-Event-ID: the API resumes exactly after it (nothing lost, nothing repeated).

import { authHeaders } from "./api.js";

export function follow(url, onMessage, { onState = () => {}, lastId = "", stopOn = "end" } = {}) {
  const control = new AbortController();
  let retryMs = 1000;
  let stopped = false;
  let current = null;

  function dispatch(msg) {
    if (msg.id !== null) lastId = msg.id;
    if (msg.event === null && msg.data === null) return;
    let data = msg.data;
    try { data = JSON.parse(msg.data); } catch { /* leave text */ }
    onMessage(msg.event || "message", data, lastId);
    if (msg.event === stopOn) stopped = true;
  }

  async function once() {
    current = new AbortController();
    const abort = () => current.abort();
    control.signal.addEventListener("abort", abort);
    const headers = authHeaders({ Accept: "text/event-stream" });
    if (lastId) headers.set("Last-Event-ID", lastId);
    try {
      const response = await fetch(url, { headers, signal: current.signal, cache: "no-store" });
      if (response.status === 401 || response.status === 403 || response.status === 404) {
        stopped = true;
        onState("error", response.status);
        return;
      }
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      onState("open");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let msg = { id: null, event: null, data: null };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let nl;
        while ((nl = buffer.search(/\r\n|\r|\n/)) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + (buffer.startsWith("\r\n", nl) ? 2 : 1));
          if (line === "") {
            dispatch(msg);
            msg = { id: null, event: null, data: null };
            if (stopped) { current.abort(); return; }
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val.startsWith(" ")) val = val.slice(1);
          if (field === "data") msg.data = msg.data === null ? val : `${msg.data}\n${val}`;
          else if (field === "event") msg.event = val;
          else if (field === "id") msg.id = val;
          else if (field === "retry" && /^\d+$/.test(val)) retryMs = Number(val);
        }
      }
    } catch (err) {
      if (control.signal.aborted) return;
    } finally {
      control.signal.removeEventListener("abort", abort);
    }
  }

  (async () => {
    while (!stopped && !control.signal.aborted) {
      await once();
      if (stopped || control.signal.aborted) break;
      onState("reconnecting");
      await new Promise((r) => setTimeout(r, retryMs));
    }
    if (!control.signal.aborted) onState("closed");
  })();

  return {
    close: () => control.abort(),
    // Drops the connection as a network failure would (tests use it to check resuming).
    drop: () => current && current.abort(),
    get lastId() { return lastId; },
  };
}
