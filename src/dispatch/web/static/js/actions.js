// The buttons every view shares: which a task gets, and what a click does. The server
// decides (a 409 is the real guard against a double start); a disabled button is only
// a courtesy.

import { post } from "./api.js";
import { toast } from "./toast.js";

export const RETRYABLE = new Set(["failed", "cancelled", "interrupted", "incomplete"]);
export const RESETTABLE = RETRYABLE;

function button(label, { primary = false, disabled = false, title = "" } = {}) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = primary ? "action primary" : "action";
  b.textContent = label;
  b.disabled = disabled;
  if (title) b.title = title;
  return b;
}

// The buttons for a task as it is now; `withReset` on the task page.
export function buttonsFor(task, view, { withReset = false } = {}) {
  const out = [];
  const closed = task.closed;
  if (RETRYABLE.has(task.status) && !closed) {
    const b = button("↻ Re-dispatch", { primary: true });
    b.setAttribute("aria-label", "Re-dispatch");
    b.addEventListener("click", () => redispatch(task, view));
    out.push(b);
  } else if (task.status === "in-progress") {
    const b = button("↻ Re-dispatch", { disabled: true, title: "task is running" });
    b.setAttribute("aria-label", "Re-dispatch");
    out.push(b);
  }
  if (task.status === "in-progress") {
    const b = button("Cancel");
    b.addEventListener("click", () => act("cancel", task, view));
    out.push(b);
  }
  if (withReset && RESETTABLE.has(task.status) && !closed) {
    const b = button("Reset");
    b.addEventListener("click", () => act("reset", task, view));
    out.push(b);
  }
  return out;
}

const attemptNumber = (task) => (task.attempt ? task.attempt.number : 0);

async function redispatch(task, view) {
  const before = view.snapshot();
  view.busy("dispatching");
  try {
    const answer = await post(
      `/api/tasks/${task.id}/redispatch?expected_attempt=${attemptNumber(task)}`,
    );
    view.apply({ ...answer.task, attempt: answer.attempt });
    toast(`Task ${task.id}: attempt ${answer.attempt.number} started.`, {
      kind: "ok",
      link: { href: `/tasks/${task.id}`, text: `Open task ${task.id}` },
    });
    for (const warning of answer.warnings ?? []) toast(`Task ${task.id}: ${warning}`);
  } catch (err) {
    view.restore(before);
    toast(`Re-dispatch of task ${task.id} refused: ${err.message}`, { kind: "error" });
  }
}

async function act(verb, task, view) {
  const before = view.snapshot();
  view.busy(verb === "cancel" ? "cancelling" : "resetting");
  try {
    const answer = await post(`/api/tasks/${task.id}/${verb}?expected_attempt=${attemptNumber(task)}`);
    view.apply({ ...answer.task, attempt: task.attempt });
    const notices = answer.notices ?? [];
    toast(notices.length ? `Task ${task.id}: ${notices.join("; ")}` : `Task ${task.id} is ${answer.task.status}.`, {
      kind: "ok",
      link: { href: `/tasks/${task.id}`, text: `Open task ${task.id}` },
    });
  } catch (err) {
    view.restore(before);
    toast(`${verb === "cancel" ? "Cancel" : "Reset"} of task ${task.id} refused: ${err.message}`, { kind: "error" });
  }
}
