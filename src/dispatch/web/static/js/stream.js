// The server's event stream, read with fetch() so that the token travels in a header
// (EventSource cannot send one, and a token in a URL ends up in logs). Reconnects
// with the last event id it saw: the server resumes right after it.

export function follow({ task = null, after = null, onEvent, onState, headers }) {
  let last = after;
  let stopped = false;
  let controller = null;
  let delay = 500;

  async function connect() {
    while (!stopped) {
      controller = new AbortController();
      const query = task === null ? "" : `?task=${task}`;
      const extra = last === null ? {} : { "Last-Event-ID": String(last) };
      try {
        const response = await fetch(`/api/events${query}`, {
          headers: headers(extra), signal: controller.signal, cache: "no-store",
        });
        if (response.status === 401) onState("unauthorized");
        if (!response.ok) throw new Error(`the event stream answered ${response.status}`);
        delay = 500;
        await read(response.body);
      } catch (err) {
        if (stopped) return;
        if (err.message.endsWith("answered 401")) {
          await new Promise((resolve) => setTimeout(resolve, 10000));
          continue;
        }
      }
      onState("offline");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 10000);
    }
  }

  async function read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        dispatchBlock(block);
      }
    }
  }

  function dispatchBlock(block) {
    let id = null;
    const data = [];
    for (const line of block.split("\n")) {
      // The server says ": connected" once it is subscribed: from then on nothing is missed.
      if (line === ": connected") onState("live");
      if (line.startsWith(":")) continue; // a comment: connected, keep-alive
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "id") id = Number(value);
      else if (field === "data") data.push(value);
    }
    if (!data.length) return;
    if (id !== null) last = id;
    onEvent(JSON.parse(data.join("\n")));
  }

  connect();
  return { stop() { stopped = true; controller?.abort(); } };
}
