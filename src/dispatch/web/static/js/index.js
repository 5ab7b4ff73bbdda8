// The tasks page: the table, its filters, and the stream that keeps it current.

import { answered, get, headers, token } from "./api.js";
import { follow } from "./stream.js";
import { STATUSES, TaskTable, age } from "./table.js";

const message = document.getElementById("message");
const live = document.getElementById("live");

function say(text) {
  message.textContent = text;
  message.hidden = !text;
}

function chips(table) {
  const box = document.getElementById("chips");
  const buttons = new Map();
  const all = document.createElement("button");
  all.type = "button";
  all.textContent = "all";
  all.addEventListener("click", () => {
    table.filter.statuses.clear();
    update();
    table.applyFilter();
  });
  box.append(all);
  for (const status of STATUSES) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.status = status;
    b.addEventListener("click", () => {
      const s = table.filter.statuses;
      if (s.has(status)) s.delete(status);
      else s.add(status);
      update();
      table.applyFilter();
    });
    buttons.set(status, b);
    box.append(b);
  }
  function update() {
    const counts = table.counts();
    all.setAttribute("aria-pressed", String(table.filter.statuses.size === 0));
    for (const [status, b] of buttons) {
      b.setAttribute("aria-pressed", String(table.filter.statuses.has(status)));
      b.replaceChildren(status);
      const n = document.createElement("span");
      n.className = "count";
      n.textContent = String(counts[status] ?? 0);
      b.append(n);
    }
  }
  return update;
}

async function main() {
  if (!token()) {
    say("No access token: open the URL that `dispatch serve` printed (it ends in #token=…).");
    live.dataset.state = "offline";
    live.textContent = "no token";
    return;
  }
  let updateChips = () => {};
  const table = new TaskTable(document.querySelector("#tasks tbody"), {
    onChange: () => {
      updateChips();
      document.getElementById("empty").hidden = table.visible() > 0;
    },
  });
  updateChips = chips(table);
  document.getElementById("filter").addEventListener("input", (e) => {
    table.filter.text = e.target.value.trim().toLowerCase();
    table.applyFilter();
  });

  const pending = new Set();
  let flush = null;
  let loaded = false;
  function schedule() {
    // A burst of events (one dispatch writes several) costs one read per task.
    flush ??= setTimeout(() => {
      for (const id of pending) table.refresh(id);
      pending.clear();
      flush = null;
    }, 100);
  }
  async function load() {
    try {
      table.load(await get("/api/tasks"));
      loaded = true;
      say("");
      if (pending.size) schedule(); // changes heard while the list was on its way
    } catch (err) {
      say(answered(err, 401)
        ? "The token was refused: open the URL that `dispatch serve` printed."
        : `Cannot load the tasks: ${err.message}`);
    }
  }
  follow({
    headers,
    onState: (state) => {
      if (state === "unauthorized") {
        say("The token was refused: open the URL that `dispatch serve` printed.");
        live.dataset.state = "offline";
        live.textContent = "token refused";
        return;
      }
      live.dataset.state = state;
      live.textContent = state === "live" ? "live" : "reconnecting…";
      // Loaded once the stream is up: nothing can change unseen in between.
      if (state === "live" && !loaded) load();
    },
    onEvent: (event) => {
      if (event.task_id === null) return;
      pending.add(event.task_id);
      if (loaded) schedule();
    },
  });
  setTimeout(() => { if (!loaded) load(); }, 1500); // the stream may be blocked: show the table anyway
  setInterval(() => {
    for (const tr of document.querySelectorAll("#tasks tbody tr")) {
      const t = table.tasks.get(Number(tr.dataset.taskId));
      if (t) tr.querySelector(".age").textContent = age(t.created_at);
    }
  }, 30000);
}

main();
