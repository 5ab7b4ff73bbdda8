// The task page: its actions, attempts, timeline, the log of its current attempt
// (followed while it runs) and what its agent changed.

import { buttonsFor } from "./actions.js";
import { answered, get, getText, headers, latest, token } from "./api.js";
import { render as renderDiff } from "./diff.js";
import { follow } from "./stream.js";
import { chip } from "./table.js";

const id = Number(/^\/tasks\/(\d+)/.exec(location.pathname)?.[1]);
const $ = (x) => document.getElementById(x);
const LOG_TAIL = 64 * 1024;
let task = null; // with its latest `attempt`
let busy = false;
let logTimer = null;

function say(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

function td(text, className = "") {
  const cell = document.createElement("td");
  cell.textContent = text ?? "–";
  if (className) cell.className = className;
  return cell;
}

function renderTask(data, busyLabel = null) {
  task = data;
  document.title = `dispatch — task ${data.id}: ${data.title}`;
  $("title").textContent = `Task ${data.id}: ${data.title}`;
  const facts = $("facts");
  facts.replaceChildren(chip(busyLabel ?? data.status, data.closed));
  const parts = [`agent ${data.agent}`, `repo ${data.repo}`, `base ${data.base_ref}`];
  if (data.branch) parts.push(`branch ${data.branch}`);
  if (data.attempt) parts.push(`attempt ${data.attempt.number} on ${data.attempt.host}`);
  for (const part of parts) {
    const span = document.createElement("span");
    span.className = "fact";
    span.textContent = part;
    facts.append(span);
  }
  if (data.last_error) {
    const err = document.createElement("div");
    err.textContent = `last error: ${data.last_error}`;
    facts.append(err);
  }
  $("actions").replaceChildren(...(busyLabel ? [] : buttonsFor(data, view, { withReset: true })));
}

function renderAttempts(attempts) {
  const rows = attempts.slice().reverse().map((a) => {
    const tr = document.createElement("tr");
    tr.append(
      td(String(a.number), "num"), td(String(a.id), "num"), td(a.state), td(a.outcome),
      td(a.exit_code === null ? null : String(a.exit_code), "num"), td(a.host), td(a.tmux_target),
      td(a.started_at), td(a.error),
    );
    return tr;
  });
  document.querySelector("#attempts tbody").replaceChildren(...rows);
}

function renderEvents(events) {
  const items = events.map((e) => {
    const li = document.createElement("li");
    const time = document.createElement("time");
    time.dateTime = e.at;
    time.textContent = e.at.replace("T", " ").replace(/\.\d+Z$/, "Z");
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = e.kind;
    li.append(time, kind);
    if (e.from_status || e.to_status) li.append(` ${e.from_status ?? "–"} → ${e.to_status ?? "–"}`);
    if (e.attempt_id) li.append(` (attempt id ${e.attempt_id})`);
    const detail = Object.entries(e.detail ?? {}).map(([k, v]) => `${k}=${v}`).join(", ");
    if (detail) li.append(` — ${detail}`);
    return li;
  });
  const list = $("events");
  const atEnd = list.scrollTop + list.clientHeight >= list.scrollHeight - 4;
  list.replaceChildren(...items);
  if (atEnd) list.scrollTop = list.scrollHeight;
}

async function loadLog() {
  clearTimeout(logTimer);
  const attempt = task?.attempt;
  const box = $("log");
  if (!attempt) {
    box.textContent = "";
    $("log-state").textContent = "(not dispatched yet)";
    return;
  }
  const running = attempt.state !== "ended";
  $("log-state").textContent = `(attempt ${attempt.number}${running ? ", following" : ""})`;
  try {
    const text = await getText(`/api/tasks/${id}/log?attempt=${attempt.number}&tail=${LOG_TAIL}`);
    const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    if (box.textContent !== text) box.textContent = text;
    if (atEnd) box.scrollTop = box.scrollHeight;
  } catch (err) {
    box.textContent = answered(err, 404) ? "(no log yet)" : err.message;
  }
  if (running) logTimer = setTimeout(loadLog, 1000);
}

async function loadDiff() {
  try {
    const totals = renderDiff($("diff"), await getText(`/api/tasks/${id}/diff`));
    $("diff-total").textContent = totals.files
      ? `(${totals.files} file${totals.files === 1 ? "" : "s"}, +${totals.added} −${totals.removed})`
      : "";
  } catch (err) {
    $("diff").textContent = err.message;
    $("diff-total").textContent = "";
  }
}

async function load() {
  if (busy) return;
  try {
    const data = await get(`/api/tasks/${id}`);
    const { attempts, events, ...rest } = data;
    renderTask({ ...rest, attempt: latest(attempts) });
    renderAttempts(attempts);
    renderEvents(events);
    say("");
    loadLog();
  } catch (err) {
    say(err.message);
  }
}

const view = {
  snapshot: () => task,
  busy: (label) => {
    busy = true;
    renderTask(task, label);
  },
  restore: (before) => {
    busy = false;
    renderTask(before);
  },
  apply: (after) => {
    busy = false;
    renderTask(after);
    load();
  },
};

function main() {
  if (!token()) {
    say("No access token: open the URL that `dispatch serve` printed (it ends in #token=…).");
    return;
  }
  let timer = null;
  let diffTimer = null;
  let loaded = false;
  follow({
    task: id,
    headers,
    onState: (state) => {
      if (state === "unauthorized") {
        say("The token was refused: open the URL that `dispatch serve` printed.");
        $("live").dataset.state = "offline";
        $("live").textContent = "token refused";
        return;
      }
      $("live").dataset.state = state;
      $("live").textContent = state === "live" ? "live" : "reconnecting…";
      if (state === "live" && !loaded) {
        loaded = true;
        load();
        loadDiff();
      }
    },
    onEvent: () => {
      timer ??= setTimeout(() => { timer = null; load(); }, 100);
      diffTimer ??= setTimeout(() => { diffTimer = null; loadDiff(); }, 1000);
    },
  });
  setTimeout(() => { if (!loaded) { loaded = true; load(); loadDiff(); } }, 1500);
}

main();
