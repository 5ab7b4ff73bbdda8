"""`dispatch run` and `dispatch redispatch`: one compensating transaction (SPEC §3).

claim -> worktree -> prompt file -> spawn -> confirm -> record. Every step's undo is
registered before it acts and every external action is preceded by a write-ahead
intent on the attempt row, so a sweep can finish the undo of a dispatcher that died.
"""

from __future__ import annotations

import os
import re
import sys
import time
import unicodedata
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from dispatch.app import App
from dispatch.errors import Conflict, DispatchError, DispatchFailed, NotFound
from dispatch.lifecycle import RETRYABLE, Action, AttemptState, Outcome, Status, next_status
from dispatch.services.saga import Saga, Step, StepFailed, signals_interrupt
from dispatch.store import queries as q
from dispatch.store.models import AgentSession, Attempt, Task, utcnow

WRAPPER_MARKER = "agent-exec"
POLL_SECONDS = 0.05


def slugify(title: str, limit: int = 40) -> str:
    """Lowercase ASCII `[a-z0-9-]`, at most `limit` characters; never empty."""
    ascii_text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "task"


def branch_name(task_id: int, title: str) -> str:
    return f"dispatch/{task_id}-{slugify(title)}"


def worktree_path(root: Path, repo: str, task_id: int) -> Path:
    return root.expanduser().resolve() / Path(repo).name / f"task-{task_id}"


def window_name(task_id: int) -> str:
    return f"t{task_id}"


def wrapper_argv(attempt_id: int) -> list[str]:
    """The wrapper, by absolute interpreter path: a running tmux server has its own PATH."""
    return [sys.executable, "-m", "dispatch", WRAPPER_MARKER, str(attempt_id)]


@dataclass
class Dispatch:
    """What one dispatch knows as it goes; the saga's context."""

    app: App
    task_id: int | None
    action: Action = Action.CLAIM
    redispatch_of: int | None = None
    attempt_id: int | None = None
    prior: Status | None = None
    task: Task | None = None
    worktree: Path | None = None
    branch: str | None = None
    window_id: str | None = None
    intent: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class DispatchResult:
    task: Task
    attempt: Attempt
    warnings: list[str]


# -- steps --------------------------------------------------------------------------------


def claim(d: Dispatch) -> bool:
    """Task -> in-progress and a `starting` attempt, in one write transaction."""
    settings = d.app.settings

    def work(s: Session) -> bool:
        if d.task_id is None:
            if settings.max_running and q.count_in_progress(s) >= settings.max_running:
                raise Conflict(f"{settings.max_running} tasks already running (max_running)")
            ids = q.ready_task_ids(s, 1)
            if not ids:
                return False
            d.task_id = ids[0]
        task = q.get_task(s, d.task_id)
        current = Status(task.status)
        if current is Status.IN_PROGRESS:
            raise _running_conflict(s, task)
        target = next_status(current, d.action, closed=task.closed_at is not None, task_id=task.id)
        settings.agent(task.agent)  # an unknown profile refuses before anything is made
        now = utcnow()
        key = f"{task.agent}:{task.repo}:{task.id}"
        agent_session = q.agent_session(s, key)
        if agent_session is None:
            agent_session = AgentSession(
                key=key, task_id=task.id, agent=task.agent, session_id=str(uuid.uuid4())
            )
            s.add(agent_session)
        agent_session.last_used_at = now
        previous = q.latest_attempts(s, [task.id]).get(task.id)
        redispatch_of = d.redispatch_of or (previous.id if previous else None)
        d.worktree = worktree_path(settings.worktree_root, task.repo, task.id)
        d.branch = task.branch or branch_name(task.id, task.title)
        resume = d.action is Action.REDISPATCH and settings.agent(task.agent).resume is not None
        attempt = Attempt(
            task_id=task.id,
            number=q.next_attempt_number(s, task.id),
            state=AttemptState.STARTING.value,
            prior_status=current.value,
            host=settings.host,
            dispatcher_pid=os.getpid(),
            tmux_session=settings.tmux_session,
            tmux_socket=settings.tmux_socket,
            worktree=str(d.worktree),
            branch=d.branch,
            session_id=agent_session.session_id,
            resume=resume,
            intent={},
            lease_expires_at=now + timedelta(seconds=settings.lease_seconds),
            started_at=now,
            redispatch_of=redispatch_of if d.action is Action.REDISPATCH else None,
        )
        s.add(attempt)
        s.flush()
        if not q.move_task(
            s, task.id, expected=current, target=target, current_attempt_id=attempt.id
        ):
            raise Conflict(f"task {task.id} changed while claiming it; try again")
        kind = "redispatched" if d.action is Action.REDISPATCH else "claimed"
        q.record_event(
            s, kind, task_id=task.id, attempt_id=attempt.id, from_status=current, to_status=target
        )
        d.attempt_id, d.prior, d.task = attempt.id, current, task
        return True

    return d.app.db.write(work)


def _running_conflict(s: Session, task: Task) -> Conflict:
    attempt = q.latest_attempts(s, [task.id]).get(task.id)
    where = ""
    if attempt is not None:
        window = f" in {attempt.tmux_target}" if attempt.tmux_target else ""
        where = f" (attempt {attempt.id} {attempt.state}{window})"
    return Conflict(
        f"task {task.id} is {task.status}{where}",
        hint=f"`dispatch cancel {task.id}` first, or wait for it",
    )


def _write_intent(d: Dispatch, **intent: Any) -> None:
    """Record what the next action is about to create, renewing the lease as we go."""
    d.intent.update(intent)
    lease = utcnow() + timedelta(seconds=d.app.settings.lease_seconds)
    snapshot = dict(d.intent)
    assert d.attempt_id is not None
    d.app.db.write(
        lambda s: q.update_attempt(s, d.attempt_id, intent=snapshot, lease_expires_at=lease)
    )


def make_worktree(d: Dispatch) -> bool:
    """Create (or, for a redispatch, reuse) the task's branch and worktree."""
    assert d.task and d.worktree and d.branch
    git, repo = d.app.worktrees, Path(d.task.repo)
    branch_existed = git.branch_exists(repo, d.branch)
    worktree_existed = d.worktree.exists() or git.is_worktree(repo, d.worktree)
    _write_intent(
        d,
        repo=str(repo),
        base=d.task.base_ref,
        branch=d.branch,
        branch_existed=branch_existed,
        worktree=str(d.worktree),
        worktree_existed=worktree_existed,
    )
    if worktree_existed:
        if not git.is_worktree(repo, d.worktree):
            raise DispatchError(f"{d.worktree} exists and is not a worktree of {repo}")
        if git.has_changes(d.worktree):
            d.warnings.append(f"worktree {d.worktree} has uncommitted changes; they are kept")
        return True
    return git.add(repo, d.worktree, d.branch, d.task.base_ref, new_branch=not branch_existed)


def undo_worktree(d: Dispatch) -> None:
    """Remove what this attempt created, never what existed before or holds work."""
    intent = d.intent
    if not intent.get("worktree"):
        return
    remove_created(d.app, intent, agent_started=_agent_started(d))


def remove_created(app: App, intent: dict[str, Any], *, agent_started: bool) -> list[str]:
    """Shared with the sweep: undo a worktree and branch from a write-ahead intent."""
    git, repo = app.worktrees, Path(intent["repo"])
    path, branch = Path(intent["worktree"]), intent.get("branch")
    kept: list[str] = []
    if not intent.get("worktree_existed"):
        if agent_started and path.exists() and git.has_changes(path):
            kept.append(f"kept worktree {path}: it has changes")
        else:
            git.remove(repo, path)
    if branch and not intent.get("branch_existed") and not kept:
        base = intent.get("base")
        if agent_started and base and git.commits_ahead(repo, base, branch) > 0:
            kept.append(f"kept branch {branch}: it has commits")
        else:
            git.delete_branch(repo, branch)
    return kept


def _agent_started(d: Dispatch) -> bool:
    if d.attempt_id is None:
        return False
    attempt = d.app.db.read(lambda s: q.get_attempt(s, d.attempt_id))  # type: ignore[arg-type]
    return attempt.agent_pid is not None


def prompt_path(app: App, attempt_id: int) -> Path:
    return app.settings.attempts_dir / str(attempt_id) / "prompt.md"


def write_prompt(d: Dispatch) -> bool:
    assert d.task and d.attempt_id
    path = prompt_path(d.app, d.attempt_id)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(d.task.prompt, encoding="utf-8")
    return path.read_text(encoding="utf-8") == d.task.prompt


def undo_prompt(d: Dispatch) -> None:
    if d.attempt_id is None:
        return
    path = prompt_path(d.app, d.attempt_id)
    path.unlink(missing_ok=True)
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


def spawn(d: Dispatch) -> bool:
    """Open the task's tmux window running the wrapper; the window id is recorded."""
    assert d.task and d.attempt_id and d.worktree
    settings = d.app.settings
    _write_intent(d, session=settings.tmux_session, window_name=window_name(d.task.id))
    env = wrapper_env(d.app)
    d.window_id = d.app.terminal.spawn(
        settings.tmux_session, window_name(d.task.id), wrapper_argv(d.attempt_id), d.worktree, env
    )
    if not d.window_id:
        return False
    target = f"{settings.tmux_session}:{d.window_id}"
    _write_intent(d, window_id=d.window_id)
    d.app.db.write(lambda s: q.update_attempt(s, d.attempt_id, tmux_target=target))
    return True


def wrapper_env(app: App) -> dict[str, str]:
    """What the wrapper needs: a running tmux server does not see our environment."""
    settings = app.settings
    env = {
        "DISPATCH_HOME": str(settings.home),
        "DISPATCH_DB": settings.database,
        "DISPATCH_TMUX_SOCKET": settings.tmux_socket,
        "DISPATCH_HOST": settings.host,
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    if settings.config_path is not None:
        env["DISPATCH_CONFIG"] = str(settings.config_path)
    return env


def undo_spawn(d: Dispatch) -> None:
    if d.attempt_id is None:
        return
    terminal = d.app.terminal
    if d.window_id:
        terminal.kill_window(d.window_id)
    # A spawn that failed after creating the window never told us its id: find it by marker.
    terminal.kill_windows_running(d.app.settings.tmux_session, wrapper_marker(d.attempt_id))


def wrapper_marker(attempt_id: int) -> str:
    return f"{WRAPPER_MARKER} {attempt_id}"


def confirm(d: Dispatch) -> bool:
    """Wait for the wrapper's acknowledgement (starting -> running, agent pid recorded)."""
    assert d.attempt_id and d.window_id
    app, attempt_id = d.app, d.attempt_id
    deadline = time.monotonic() + app.settings.spawn_timeout
    next_window_check = 0.0
    while True:
        attempt = app.db.read(lambda s: q.get_attempt(s, attempt_id))
        if attempt.state == AttemptState.ENDED.value and attempt.agent_pid is None:
            raise DispatchError(attempt.error or "the agent wrapper gave up before starting")
        if attempt.agent_pid is not None:
            return app.terminal.window_exists(d.window_id) or attempt.exit_code is not None
        now = time.monotonic()
        if now >= next_window_check:
            if not app.terminal.window_exists(d.window_id):
                raise DispatchError("the tmux window closed before the agent wrapper started")
            next_window_check = now + 0.25
        if now >= deadline:
            # Exactly one side decides: if this update wins, a late wrapper will not start.
            gave_up = app.db.write(
                lambda s: q.move_attempt(
                    s,
                    attempt_id,
                    expected=[AttemptState.STARTING],
                    target=AttemptState.ENDED,
                    outcome=Outcome.DISPATCH_FAILED.value,
                    ended_at=utcnow(),
                )
            )
            if gave_up:
                raise DispatchError(
                    f"no acknowledgement from the agent wrapper within "
                    f"{app.settings.spawn_timeout:g}s"
                )
        time.sleep(POLL_SECONDS)


def record(d: Dispatch) -> bool:
    """The dispatch succeeded: clear the failure count, note where the task lives.

    A quick agent may already have finished and recorded its outcome; that still counts.
    False only when the attempt was ended by someone else (reaped) before it could run.
    """
    assert d.task and d.attempt_id
    task_id, attempt_id = d.task.id, d.attempt_id

    def work(s: Session) -> bool:
        attempt = q.get_attempt(s, attempt_id)
        ran = attempt.state == AttemptState.RUNNING.value or attempt.exit_code is not None
        if not ran:
            return False
        q.update_task(
            s, task_id, dispatch_failures=0, branch=d.branch, worktree=str(d.worktree),
        )
        q.update_attempt(s, attempt_id, lease_expires_at=None)
        task = q.get_task(s, task_id)
        if task.current_attempt_id == attempt_id:
            q.update_task(s, task_id, last_error=None)
        q.record_event(
            s, "dispatched", task_id=task_id, attempt_id=attempt_id, window=d.window_id,
        )
        return True

    return d.app.db.write(work)


STEPS: list[Step[Dispatch]] = [
    Step("claim", claim, atomic=True),
    Step("worktree", make_worktree, undo_worktree),
    Step("prompt file", write_prompt, undo_prompt),
    Step("spawn", spawn, undo_spawn),
    Step("confirm", confirm),
    Step("record", record),
]


# -- failure handling -----------------------------------------------------------------------


def fence(d: Dispatch) -> None:
    """End the attempt first, so a wrapper that is still starting can no longer touch the task."""
    if d.attempt_id is None:
        return
    d.app.db.write(
        lambda s: q.move_attempt(
            s,
            d.attempt_id,
            expected=[AttemptState.STARTING, AttemptState.RUNNING],  # type: ignore[arg-type]
            target=AttemptState.ENDED,
            outcome=Outcome.DISPATCH_FAILED.value,
            ended_at=utcnow(),
        )
    )


def roll_back(app: App, attempt_id: int, error: str, detail: dict[str, Any]) -> Status | None:
    """Task back to its pre-claim status (or `failed` past the cap); shared with the sweep."""
    settings = app.settings

    def work(s: Session) -> Status | None:
        attempt = q.get_attempt(s, attempt_id)
        q.move_attempt(
            s,
            attempt_id,
            expected=[AttemptState.STARTING, AttemptState.RUNNING],
            target=AttemptState.ENDED,
            outcome=Outcome.DISPATCH_FAILED.value,
            ended_at=utcnow(),
        )
        q.update_attempt(s, attempt_id, error=error, lease_expires_at=None)
        task = q.get_task(s, attempt.task_id)
        if task.status != Status.IN_PROGRESS.value or task.current_attempt_id != attempt_id:
            return None  # superseded: the attempt's failure is recorded, the task is not ours
        failures = task.dispatch_failures + 1
        target = next_status(
            Status.IN_PROGRESS,
            Action.ROLLBACK,
            prior=Status(attempt.prior_status),
            failures=failures,
            max_failures=settings.max_dispatch_failures,
            task_id=task.id,
        )
        moved = q.move_task(
            s,
            task.id,
            expected=Status.IN_PROGRESS,
            target=target,
            attempt_id=attempt_id,
            fence_attempt=True,
            current_attempt_id=None,
            dispatch_failures=failures,
            last_error=error,
        )
        if not moved:
            return None
        q.record_event(
            s,
            "dispatch-failed",
            task_id=task.id,
            attempt_id=attempt_id,
            from_status=Status.IN_PROGRESS,
            to_status=target,
            error=error,
            failures=failures,
            **detail,
        )
        return target

    return app.db.write(work)


def _on_failure(d: Dispatch, failure: StepFailed) -> None:
    if d.attempt_id is None:
        return
    error = f"{failure.step}: {failure.reason}"
    detail: dict[str, Any] = {"step": failure.step}
    if failure.undo_errors:
        detail["undo_errors"] = failure.undo_errors
    d.prior = roll_back(d.app, d.attempt_id, error, detail) or d.prior


# -- use cases ------------------------------------------------------------------------------


def dispatch_task(
    app: App,
    task_id: int | None,
    *,
    action: Action = Action.CLAIM,
    redispatch_of: int | None = None,
) -> DispatchResult | None:
    """Run the saga for one task (`task_id` None: the highest-priority ready task)."""
    d = Dispatch(app, task_id, action=action, redispatch_of=redispatch_of)
    saga: Saga[Dispatch] = Saga(STEPS)
    try:
        with signals_interrupt():
            saga.run(d, fence=fence, on_failure=lambda f: _on_failure(d, f))
    except StepFailed as failure:
        if failure.step == "claim" and isinstance(failure.cause, DispatchError):
            raise failure.cause from None  # a refusal (conflict, closed, unknown): nothing made
        if (
            failure.step == "claim"
            and d.attempt_id is None
            and failure.cause == "reported success but did not do its work"
        ):
            return None  # --next found nothing ready
        raise _failed(app, d, failure) from None
    assert d.attempt_id is not None
    attempt_id = d.attempt_id

    def load(s: Session) -> DispatchResult:
        attempt = q.get_attempt(s, attempt_id)
        return DispatchResult(q.get_task(s, attempt.task_id), attempt, d.warnings)

    return app.db.read(load)


def _failed(app: App, d: Dispatch, failure: StepFailed) -> DispatchFailed:
    status = "unknown"
    if d.task_id is not None:
        try:
            status = app.db.read(lambda s: q.get_task(s, d.task_id).status)  # type: ignore[arg-type]
        except DispatchError:
            pass
    undo = f"; undo problems: {'; '.join(failure.undo_errors)}" if failure.undo_errors else ""
    name = f"task {d.task_id}" if d.task_id is not None else "the next task"
    return DispatchFailed(
        f"dispatch of {name} failed at {failure.step}: {failure.reason}; "
        f"rolled back, task is {status}{undo}"
    )


def run_next(app: App, limit: int) -> list[DispatchResult | DispatchFailed]:
    """Dispatch up to `limit` of the highest-priority ready tasks, within max_running."""
    results: list[DispatchResult | DispatchFailed] = []
    for _ in range(limit):
        try:
            result = dispatch_task(app, None)
        except DispatchFailed as exc:
            results.append(exc)
            continue
        except Conflict:
            break  # max_running reached
        if result is None:
            break
        results.append(result)
    return results


def redispatch(
    app: App, task_id: int | None = None, attempt_id: int | None = None
) -> DispatchResult:
    """A fresh attempt after a failure, reusing the worktree and resuming the session."""
    previous: int | None = None
    if attempt_id is not None:
        attempt = app.db.read(lambda s: q.get_attempt(s, attempt_id))
        task_id, previous = attempt.task_id, attempt.id
    if task_id is None:
        raise NotFound("give a task id or --attempt")
    result = dispatch_task(app, task_id, action=Action.REDISPATCH, redispatch_of=previous)
    assert result is not None
    return result


__all__ = ["RETRYABLE", "DispatchResult", "dispatch_task", "redispatch", "run_next", "slugify"]
