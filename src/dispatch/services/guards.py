"""The per-task guard: `gc` removing a worktree and a dispatch taking it up exclude each other.

A dispatch claims its task with a conditional update, then makes or reuses the
worktree; `gc` checks the task's status, then removes it. Checked and acted on under
one lock, neither can act on what the other has just decided: a gc that holds it sees
any claim made before it, and a dispatch that waited for it finds the worktree gone
(and restores it). A file lock (`dispatch.flock`, as for `git worktree add`) is released
by the kernel when its holder dies, so a killed gc never leaves a task locked.
"""

from __future__ import annotations

from dispatch.app import App
from dispatch.flock import FileLock


def task_guard(app: App, task_id: int, timeout: float = -1) -> FileLock:
    """The lock for one task's worktree (`timeout` < 0: wait as long as it takes).

    Not re-entrant across calls: take it once per operation.
    """
    locks = app.settings.locks_dir
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"task-{task_id}.lock"), timeout=timeout)


def path_guard(app: App, name: str, timeout: float = -1) -> FileLock:
    """The same guard for a worktree that belongs to no task (an orphan), by its name."""
    import hashlib

    locks = app.settings.locks_dir
    locks.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(name.encode()).hexdigest()[:20]
    return FileLock(str(locks / f"orphan-{digest}.lock"), timeout=timeout)
