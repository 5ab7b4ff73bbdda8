"""`dispatch restore`: bring a collected worktree back, its uncommitted work included (SPEC §9).

The worktree is made again at its recorded path on its branch (from the commit gc
recorded when the branch itself was collected), then the latest snapshot is applied.
The `restored` event comes last: a restore killed half way is finished by the next
restore, or by the dispatch that takes the task up again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dispatch.adapters.snapshots import WIP_PREFIX, Snapshots
from dispatch.app import App
from dispatch.errors import Conflict, DispatchError
from dispatch.lifecycle import Status
from dispatch.services.guards import task_guard
from dispatch.store import statements as st
from dispatch.store.collected import RESTORED, is_collected, last_collection
from dispatch.store.statements import TaskRow


@dataclass(frozen=True)
class Restored:
    task_id: int
    worktree: str
    branch: str | None
    snapshot: str | None  # the ref applied, if the worktree had uncommitted work
    restored: bool  # False: the worktree was there already, nothing to do


def restore(app: App, task_id: int) -> Restored:
    """Recreate a task's worktree and re-apply its snapshot; refuse a running task."""
    task = app.direct.read(lambda tx: st.get_task(tx, task_id))
    if task.status == Status.IN_PROGRESS.value:
        raise Conflict(
            f"task {task.id} is in-progress; its worktree is in use",
            hint=f"`dispatch cancel {task.id}` first, or wait for it",
        )
    if task.worktree is None:
        raise Conflict(f"task {task.id} is {task.status} and never had a worktree")
    with task_guard(app, task.id):
        return _restore(app, app.direct.read(lambda tx: st.get_task(tx, task_id)))


def restore_collected(app: App, task: TaskRow, attempt_id: int | None = None) -> bool:
    """For a dispatch taking a task up again (its caller holds the task's guard): bring
    back a collected worktree first, so the agent finds its work. Whether it did."""
    if task.worktree is None:
        return False
    last = app.direct.read(lambda tx: last_collection(tx, task.id))
    if not is_collected(last):
        return False
    return _restore(app, task, attempt_id).restored


def _restore(app: App, task: TaskRow, attempt_id: int | None = None) -> Restored:
    assert task.worktree is not None
    git, snapshots = app.worktrees, Snapshots()
    path, repo, branch = Path(task.worktree), Path(task.repo), task.branch
    last = app.direct.read(lambda tx: last_collection(tx, task.id))
    collected = is_collected(last)
    registered = git.is_worktree(repo, path)
    if registered and path.is_dir() and not collected:
        return Restored(task.id, str(path), branch, None, restored=False)
    detail = last.detail if last is not None and collected else {}
    commit, ref = detail.get("commit"), detail.get("ref")
    if registered and path.is_dir():
        # A restore killed after making the worktree, maybe half way through applying
        # the snapshot: apply it again. Whatever the worktree holds now is saved first,
        # under a ref of its own, in case someone worked in it meanwhile.
        if commit:
            snapshots.clear_stale_index_lock(path)
            if snapshots.is_dirty(path):
                message = f"dispatch restore: task {task.id}, before re-applying {commit}"
                side = f"{ref or f'{WIP_PREFIX}{task.id}'}-unrestored"
                snapshots.save(path, side, message)
    else:
        if path.exists():
            raise Conflict(
                f"{path} exists and is not a worktree of {repo}",
                hint="move it away, then restore again",
            )
        if registered:
            git.remove(repo, path)  # a stale registration: its directory is gone
        _checkout(app, task, path, detail.get("head"))
    if commit:
        snapshots.apply(path, commit)
    app.direct.write(
        lambda tx: st.record_event(
            tx,
            RESTORED,
            task_id=task.id,
            attempt_id=attempt_id,
            worktree=str(path),
            branch=branch,
            ref=ref,
            commit=commit,
        )
    )
    return Restored(task.id, str(path), branch, ref if commit else None, restored=True)


def _checkout(app: App, task: TaskRow, path: Path, head: str | None) -> None:
    """The worktree on the task's branch; the branch made again at `head` if gc took it."""
    git, repo = app.worktrees, Path(task.repo)
    if not task.branch:
        raise DispatchError(f"task {task.id} has no branch to restore its worktree on")
    if git.branch_exists(repo, task.branch):
        done = git.add(repo, path, task.branch, "", new_branch=False)
    elif head:
        done = git.add(repo, path, task.branch, head, new_branch=True)
    else:
        raise Conflict(
            f"branch {task.branch} of task {task.id} is gone and gc recorded no commit for it"
        )
    if not done or not path.is_dir():
        raise DispatchError(f"git reported worktree {path} made, but it is not there")
