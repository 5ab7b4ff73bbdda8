// The tasks table: one row a task, kept in step with the server by `refresh(id)`.

import { buttonsFor } from "./actions.js";
import { answered, get, latest } from "./api.js";

export const STATUSES = ["ready", "in-progress", "failed", "incomplete", "interrupted", "cancelled", "done"];

export function chip(status, closed = false) {
  const span = document.createElement("span");
  span.className = "chip";
  span.dataset.status = status;
  span.textContent = status;
  if (closed) {
    const c = document.createElement("span");
    c.className = "closed";
    c.textContent = " (closed)";
    span.append(c);
  }
  return span;
}

export function age(iso) {
  const seconds = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (seconds < 60) return `${Math.floor(seconds)}s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)}m`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)}h`;
  return `${Math.floor(seconds / 86400)}d`;
}

function cell(content, className = "") {
  const td = document.createElement("td");
  if (className) td.className = className;
  if (typeof content === "object" && content !== null) td.append(content); // an element
  else td.textContent = content ?? "";
  return td;
}

export class TaskTable {
  constructor(tbody, { onChange }) {
    this.tbody = tbody;
    this.tasks = new Map(); // id -> task with its latest `attempt`
    this.rows = new Map(); // id -> <tr>
    this.busy = new Map(); // id -> whether a refresh came in while busy
    this.filter = { statuses: new Set(), text: "" };
    this.onChange = onChange;
  }

  load(tasks) {
    this.tasks = new Map(tasks.map((t) => [t.id, t]));
    this.tbody.replaceChildren();
    this.rows.clear();
    for (const t of tasks) this.render(t.id);
    this.onChange();
  }

  // A task changed somewhere: read it again (deferred while its own action runs).
  async refresh(id) {
    if (this.busy.has(id)) {
      this.busy.set(id, true);
      return;
    }
    try {
      const data = await get(`/api/tasks/${id}`);
      if (this.busy.has(id)) return void this.busy.set(id, true);
      const { attempts, events, ...task } = data;
      if (task.closed) this.remove(id); // the table shows open tasks, as `dispatch list`
      else this.put({ ...task, attempt: latest(attempts) });
    } catch (err) {
      if (answered(err, 404)) this.remove(id);
    }
  }

  put(task) {
    this.tasks.set(task.id, task);
    this.render(task.id);
    this.onChange();
  }

  remove(id) {
    this.tasks.delete(id);
    this.rows.get(id)?.remove();
    this.rows.delete(id);
    this.onChange();
  }

  view(id) {
    // What an action needs: save the row, show it busy, put it back or apply the answer.
    return {
      snapshot: () => this.tasks.get(id),
      busy: (label) => {
        this.busy.set(id, false);
        this.render(id, label);
      },
      restore: (task) => this.settle(id, task),
      apply: (task) => this.settle(id, task),
    };
  }

  settle(id, task) {
    const missed = this.busy.get(id);
    this.busy.delete(id);
    this.put(task);
    if (missed) this.refresh(id);
  }

  render(id, busyLabel = null) {
    const t = this.tasks.get(id);
    const tr = document.createElement("tr");
    tr.dataset.taskId = String(id);
    tr.dataset.status = busyLabel ?? t.status;
    const link = document.createElement("a");
    link.href = `/tasks/${id}`;
    link.textContent = t.title;
    const actions = cell("", "actions");
    if (busyLabel) {
      tr.setAttribute("aria-busy", "true");
    } else {
      actions.append(...buttonsFor(t, this.view(id)));
    }
    tr.append(
      cell(String(id), "num"),
      cell(link, "title"),
      cell(chip(busyLabel ?? t.status, t.closed), "status"),
      cell(t.attempt ? String(t.attempt.number) : "–", "num attempt"),
      cell(t.attempt?.host ?? "–", "host"),
      cell(age(t.created_at), "age"),
      cell(t.last_error ?? "", "error"),
      actions,
    );
    tr.querySelector(".age").title = t.created_at;
    tr.hidden = !this.matches(t);
    const old = this.rows.get(id);
    if (old) old.replaceWith(tr);
    else this.insert(id, tr);
    this.rows.set(id, tr);
  }

  insert(id, tr) {
    // New tasks go where `list` would show them: priority first, then id.
    const t = this.tasks.get(id);
    for (const [otherId, row] of this.rows) {
      const o = this.tasks.get(otherId);
      if (o.priority < t.priority || (o.priority === t.priority && otherId > id)) {
        row.before(tr);
        return;
      }
    }
    this.tbody.append(tr);
  }

  matches(t) {
    const { statuses, text } = this.filter;
    if (statuses.size && !statuses.has(t.status)) return false;
    if (!text) return true;
    const hay = [t.id, t.title, t.status, t.agent, t.attempt?.host, t.last_error, t.branch]
      .join(" ").toLowerCase();
    return hay.includes(text);
  }

  applyFilter() {
    for (const [id, tr] of this.rows) tr.hidden = !this.matches(this.tasks.get(id));
    this.onChange();
  }

  counts() {
    const counts = Object.fromEntries(STATUSES.map((s) => [s, 0]));
    for (const t of this.tasks.values()) counts[t.status] = (counts[t.status] ?? 0) + 1;
    return counts;
  }

  visible() {
    return [...this.rows.values()].filter((tr) => !tr.hidden).length;
  }
}
