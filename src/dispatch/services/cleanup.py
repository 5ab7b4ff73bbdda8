"""Undoing a dispatch from what it recorded: shared by the saga's undos and the sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dispatch.adapters.protocols import Terminal
from dispatch.app import App
from dispatch.lifecycle import Action, AttemptState, Status, next_status
from dispatch.services.intent import Intent
from dispatch.services.naming import prompt_path, wrapper_marker
from dispatch.store import statements as st
from dispatch.store.direct import Tx


def remove_created(app: App, intent: Intent, *, agent_started: bool) -> list[str]:
    """Shared with the sweep: undo a worktree and branch from a write-ahead intent."""
    if intent.repo is None or intent.worktree is None:
        return []  # nothing was about to be made
    git, repo = app.worktrees, Path(intent.repo)
    path, branch = Path(intent.worktree), intent.branch
    kept: list[str] = []
    if not intent.worktree_existed:
        if agent_started and path.exists() and git.has_changes(path):
            kept.append(f"kept worktree {path}: it has changes")
        else:
            git.remove(repo, path)
    elif intent.switched_from and branch:
        kept.extend(_switch_back(app, intent, branch, agent_started=agent_started))
    if branch and not intent.branch_existed and not kept:
        if agent_started and intent.base and git.commits_ahead(repo, intent.base, branch) > 0:
            kept.append(f"kept branch {branch}: it has commits")
        else:
            git.delete_branch(repo, branch)
    return kept


def _switch_back(app: App, intent: Intent, branch: str, *, agent_started: bool) -> list[str]:
    """An existing worktree this attempt moved to a new branch goes back to the branch it
    was on, unless the agent left changes there (then both stay as they are)."""
    assert intent.repo and intent.worktree and intent.switched_from
    git, repo, path = app.worktrees, Path(intent.repo), Path(intent.worktree)
    if not path.exists() or git.head_ref(path) != branch:
        return []  # never switched, or switched back already
    if agent_started and git.has_changes(path):
        return [f"kept worktree {path} on {branch}: it has changes"]
    if agent_started and intent.base and git.commits_ahead(repo, intent.base, branch) > 0:
        return [f"kept worktree {path} on {branch}: it has commits"]
    git.switch(repo, path, intent.switched_from)
    return []


def kill_attempt_windows(terminal: Terminal, session: str, attempt_id: int) -> list[str]:
    """Kill the windows of `session` running this attempt's wrapper, and only those.

    tmux renders the argv as one string; the wrapper's argv ends with the attempt id,
    so an exact suffix match keeps attempt 5's undo away from attempt 50's window.
    """
    suffix = " " + wrapper_marker(attempt_id)
    killed: list[str] = []
    for pane in terminal.list_panes():
        if pane.session != session or pane.window_id in killed:
            continue
        if pane.start_command.rstrip().endswith(suffix):
            terminal.kill_window(pane.window_id)
            killed.append(pane.window_id)
    return killed


def roll_back(app: App, attempt_id: int, error: str, detail: dict[str, Any]) -> Status | None:
    """Task back to its pre-claim status (or `failed` past the cap); shared with the sweep."""
    settings = app.settings

    def work(tx: Tx) -> Status | None:
        attempt = st.get_attempt(tx, attempt_id)
        st.end_failed_dispatch(
            tx, attempt_id, expected=[AttemptState.STARTING, AttemptState.RUNNING]
        )
        st.update_attempt(tx, attempt_id, error=error, lease_expires_at=None)
        task = st.get_task(tx, attempt.task_id)
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
        if not st.release_task(
            tx,
            task.id,
            attempt_id=attempt_id,
            target=target,
            kind="dispatch-failed",
            columns={"dispatch_failures": failures, "last_error": error},
            detail={"error": error, "failures": failures, **detail},
        ):
            return None
        return target

    return app.direct.write(work)


def remove_prompt(app: App, attempt_id: int) -> None:
    """Delete an attempt's prompt file, and its directory once empty."""
    path = prompt_path(app, attempt_id)
    path.unlink(missing_ok=True)
    if path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()
