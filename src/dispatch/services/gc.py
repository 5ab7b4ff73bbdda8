"""`dispatch gc`: reclaim the worktrees of finished tasks without ever losing work (SPEC §9).

For each worktree, under the task's guard and after checking again that no attempt
uses it: a snapshot of anything uncommitted is written to its ref first (write-ahead),
then the directory is renamed aside in one step, its registration dropped, the `gc`
event recorded, and only then is the renamed directory deleted. Killed anywhere, the
worktree is either whole at its path (the next gc snapshots it again) or gone from it
with its snapshot already written (the next gc finishes the removal and records it).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import sys
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from dispatch.adapters.snapshots import WIP_PREFIX, Snapshots, disk_usage
from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.errors import DispatchError
from dispatch.flock import LockHeld
from dispatch.lifecycle import RETRYABLE, Status
from dispatch.services.control import agent_processes
from dispatch.services.guards import path_guard, task_guard
from dispatch.services.sweep import _orphan_dirs, _task_dirs
from dispatch.store import statements as st
from dispatch.store.collected import (
    GC,
    GcCandidate,
    gc_candidates,
    is_collected,
    last_collection,
    live_worktrees,
)
from dispatch.store.direct import Tx
from dispatch.store.statements import census

# How long gc waits for a task's guard (a dispatch making its worktree, another gc)
# before it leaves that task for the next run.
GUARD_SECONDS = 30.0
# A removed worktree is renamed to this prefix first: not `task-*`, so the sweep
# never takes it for an orphan worktree.
_TRASH = ".gc-trash-"


@dataclass(frozen=True)
class GcOptions:
    older_than: float
    include_failed: bool = False
    branches: bool = False
    orphans: bool = False
    dry_run: bool = False


@dataclass(frozen=True)
class Removed:
    task_id: int | None
    worktree: str
    snapshot: str | None
    bytes: int


@dataclass(frozen=True)
class Kept:
    task_id: int | None
    reason: str


@dataclass
class GcReport:
    dry_run: bool = False
    removed: list[Removed] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)
    branches: list[str] = field(default_factory=list)  # branches deleted (or that would be)
    problems: list[str] = field(default_factory=list)

    @property
    def freed_bytes(self) -> int:
        return sum(r.bytes for r in self.removed)


Progress = Callable[[int], AbstractContextManager[Callable[[], None]]]


def snapshot_ref(task_id: int, attempt_id: int | None) -> str:
    return f"{WIP_PREFIX}{task_id}-{attempt_id or 0}"


def orphan_ref(name: str) -> str:
    """`refs/dispatch/wip/orphan-<name>`, the name kept to what a ref may hold."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "worktree"
    return f"{WIP_PREFIX}orphan-{safe}"


def collect(app: App, options: GcOptions, progress: Progress | None = None) -> GcReport:
    """Remove what may go, keep (and say why) what may not; change nothing with dry_run."""
    statuses = [Status.DONE.value]
    if options.include_failed:
        statuses += sorted(s.value for s in RETRYABLE)
    before = utcnow() - timedelta(seconds=options.older_than)
    root = app.settings.worktree_root.expanduser().resolve()
    candidates = app.direct.read(lambda tx: gc_candidates(tx, statuses, before))
    orphans = _orphans(app, root) if options.orphans else []
    report = GcReport(dry_run=options.dry_run)
    if not options.dry_run:
        _finish_trash(root, report)
    work = Collector(app, options, root, report)
    bar = progress(len(candidates) + len(orphans)) if progress else nullcontext(_no_op)
    with bar as advance:
        for candidate in candidates:
            work.task(candidate)
            advance()
        for path in orphans:
            work.orphan(path, before.timestamp())
            advance()
    return report


def _no_op() -> None:
    return None


def _orphans(app: App, root: Path) -> list[Path]:
    """What the sweep reports as orphan worktrees: task directories no task owns."""
    dirs = _task_dirs(root)
    task_ids = sorted({n for _, n in dirs if n is not None})
    repos = app.direct.read(lambda tx: census(tx, task_ids)).repos
    return [Path(p) for p in _orphan_dirs(dirs, repos)]


def _inside(path: Path, root: Path) -> bool:
    """Whether path, symlinks resolved, lies strictly inside the worktree root."""
    resolved = Path(os.path.realpath(path))
    return resolved != root and resolved.is_relative_to(root)


def _finish_trash(root: Path, report: GcReport) -> None:
    """Delete what a killed gc renamed aside: its snapshot was written before the rename."""
    for trash in sorted(root.glob(f"*/{_TRASH}*")):
        _delete(trash, report)


def _delete(path: Path, report: GcReport) -> None:
    """rmtree, also of read-only directories (module caches make them); a concurrent gc
    finishing the same leftover is no error."""
    for _ in range(3):
        try:
            _rmtree(path)
            return
        except FileNotFoundError:
            if not os.path.lexists(path):
                return
        except OSError as exc:
            report.problems.append(f"cannot delete {path}: {exc}; the next gc tries again")
            return


def _rmtree(path: Path) -> None:
    def writable_then_retry(function: Callable[[str], object], name: str, _exc: object) -> None:
        # The directory holding the entry, and the entry when it is an unreadable
        # directory: never through a symlink, which could point anywhere.
        for target in (os.path.dirname(name), name):
            if os.path.isdir(target) and not os.path.islink(target):
                os.chmod(target, os.stat(target).st_mode | stat.S_IRWXU)
        function(name)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=writable_then_retry)
    else:  # onerror is deprecated from 3.12 on
        shutil.rmtree(path, onerror=writable_then_retry)


@dataclass
class Collector:
    """One gc run's work on each worktree."""

    app: App
    options: GcOptions
    root: Path
    report: GcReport
    snapshots: Snapshots = field(default_factory=Snapshots)

    # -- tasks ----------------------------------------------------------------------------

    def task(self, c: GcCandidate) -> None:
        path, repo = Path(c.worktree), Path(c.repo)
        if c.host is not None and c.host != self.app.settings.host:
            # Made on another host of the fleet: that host's gc keeps or collects it (SPEC
            # §10). Judged from here, a path missing on this host would pass for removed.
            return
        if not _inside(path, self.root):
            if os.path.lexists(path):  # one that is gone is nothing to report
                self._keep(
                    c.id, f"worktree {path} is outside worktree_root {self.root}; not touched"
                )
            return
        try:
            if self.options.dry_run:
                self._plan_task(c, path)
                return
            with task_guard(self.app, c.id, timeout=GUARD_SECONDS):
                reason = self.app.direct.read(lambda tx: _in_use(tx, c, path))
                if reason is not None:
                    self._keep(c.id, reason)
                    return
                self._remove_task_worktree(c, path, repo)
                if self.options.branches:
                    self._remove_branch(c, path, repo)
        except LockHeld:
            self._keep(c.id, "a dispatch or another gc is using it; left for the next gc")
        except Exception as exc:
            # Whatever failed, nothing was removed before its snapshot was written; one
            # broken repository must not stop the rest of a cron run.
            self._keep(c.id, f"not collected: {_describe(exc)}")

    def _plan_task(self, c: GcCandidate, path: Path) -> None:
        """What a real run would do, from reads alone."""
        reason = self.app.direct.read(lambda tx: _in_use(tx, c, path))
        if reason is not None:
            self._keep(c.id, reason)
            return
        collected = is_collected(self.app.direct.read(lambda tx: last_collection(tx, c.id)))
        if not os.path.lexists(path):
            if not collected:
                self.report.removed.append(Removed(c.id, str(path), self._old_ref(c), 0))
        else:
            why = self._unusable(c, path)
            if why is not None:
                self._keep(c.id, why)
                return
            usage = disk_usage(path)
            if usage.nested:
                self._keep(c.id, _nested(path, usage.nested))
                return
            dirty = self.snapshots.is_dirty(path)
            ref = snapshot_ref(c.id, c.attempt_id) if dirty else None
            self.report.removed.append(Removed(c.id, str(path), ref, usage.bytes))
        if self.options.branches:
            self._plan_branch(c, Path(c.repo))

    def _old_ref(self, c: GcCandidate) -> str | None:
        ref = snapshot_ref(c.id, c.attempt_id)
        return ref if self.snapshots.commit_of(Path(c.repo), ref) else None

    def _unusable(self, c: GcCandidate, path: Path) -> str | None:
        """Why an existing directory at a task's worktree path is not for gc to remove."""
        if not self.app.worktrees.is_worktree(Path(c.repo), path):
            return f"{path} is not a worktree of {c.repo}; left alone"
        if self.snapshots.is_locked(path):
            return f"worktree {path} is locked (git worktree lock); left alone"
        return self._agents_in(c, path) or self._unreferenced(path, Path(c.repo), "worktree")

    def _agents_in(self, c: GcCandidate, path: Path) -> str | None:
        """Why the worktree stays while processes of the task's attempts on this host run."""
        # An agent deaf to the signals outlives its reaped wrapper, and would go on
        # writing in a deleted directory. Another host's processes cannot be seen from
        # here, and /proc is read only for a task last run on this host.
        here = self.app.settings.host
        attempts = self.app.direct.read(lambda tx: st.attempts_of(tx, c.id))
        if not attempts or attempts[-1].host != here:
            return None
        alive: dict[int, int] = {}
        for attempt in attempts:
            if attempt.host == here:
                alive.update(dict.fromkeys(agent_processes(self.app, attempt), attempt.id))
        if not alive:
            return None
        pids = " ".join(map(str, sorted(alive)))
        ids = sorted(set(alive.values()))
        which = f"attempt {ids[0]}" if len(ids) == 1 else f"attempts {', '.join(map(str, ids))}"
        return (
            f"processes {pids} of {which} are still running in worktree {path}; left alone"
            f" (wait for them to exit, or stop them: kill {pids})"
        )

    def _unreferenced(self, path: Path, repo: Path, what: str) -> str | None:
        """Why the worktree stays while its detached HEAD holds commits no ref does."""
        # A snapshot saves only what is uncommitted, and `restore` checks out the task's
        # branch: such commits would be in no ref after the removal, for git's gc to take.
        head = self.snapshots.unreferenced_head(path, repo)
        if head is None:
            return None
        return (
            f"{what} {path}: HEAD {head[:12]} is detached and no branch or tag holds it;"
            f" left alone (`git -C {path} branch NAME` keeps it, then gc may take the worktree)"
        )

    def _remove_task_worktree(self, c: GcCandidate, path: Path, repo: Path) -> None:
        collected = is_collected(self.app.direct.read(lambda tx: last_collection(tx, c.id)))
        if not os.path.lexists(path):
            if collected:
                return  # collected by an earlier gc: nothing left to do
            # Deleted by hand, or a gc killed after renaming it aside: drop the stale
            # registration and record the removal with the snapshot written before it.
            self.app.worktrees.remove(repo, path)
            ref = self._old_ref(c)
            commit = self.snapshots.commit_of(repo, ref) if ref else None
            head = self.snapshots.parent_of(repo, commit) if commit else None
            self._record(c, path, ref, commit, head, 0, note="its directory was already gone")
            return
        why = self._unusable(c, path)
        if why is not None:
            self._keep(c.id, why)
            return
        usage = disk_usage(path)
        if usage.nested:
            self._keep(c.id, _nested(path, usage.nested))
            return
        size = usage.bytes
        ref = commit = None
        if self.snapshots.is_dirty(path):
            saved = self.snapshots.save(path, snapshot_ref(c.id, c.attempt_id), _message(c))
            ref, commit = saved.ref, saved.commit
        head = self.snapshots.head(path)
        trash = _rename_aside(path)
        self.app.worktrees.remove(repo, path)
        self._record(c, path, ref, commit, head, size)
        if trash is not None:
            _delete(trash, self.report)

    def _record(
        self,
        c: GcCandidate,
        path: Path,
        ref: str | None,
        commit: str | None,
        head: str | None,
        size: int,
        note: str | None = None,
    ) -> None:
        self.app.direct.write(
            lambda tx: st.record_event(
                tx,
                GC,
                task_id=c.id,
                attempt_id=c.attempt_id,
                worktree=str(path),
                ref=ref,
                commit=commit,
                head=head,
                branch=c.branch,
                bytes=size,
                note=note,
            )
        )
        self.report.removed.append(Removed(c.id, str(path), ref, size))

    def _merged(self, c: GcCandidate, repo: Path) -> tuple[bool, str | None]:
        """(whether the branch may go, why not); only existing, merged branches may."""
        if not c.branch or not self.app.worktrees.branch_exists(repo, c.branch):
            return False, None
        try:
            merged = self.snapshots.is_merged(repo, c.branch, c.base_ref)
        except Exception as exc:  # GitPython: an unknown base ref is BadName or ValueError
            return False, f"branch {c.branch} kept: cannot compare with {c.base_ref} ({exc})"
        if not merged:
            return False, f"branch {c.branch} is not merged into {c.base_ref}; kept"
        return True, None

    def _plan_branch(self, c: GcCandidate, repo: Path) -> None:
        merged, why = self._merged(c, repo)
        if why:
            self._keep(c.id, why)
        elif merged and c.branch:
            self.report.branches.append(c.branch)

    def _remove_branch(self, c: GcCandidate, path: Path, repo: Path) -> None:
        if os.path.lexists(path) or self.app.worktrees.is_worktree(repo, path):
            return  # the worktree stayed, and it has the branch checked out
        merged, why = self._merged(c, repo)
        if why:
            self._keep(c.id, why)
        if not merged or not c.branch:
            return
        branch = c.branch
        head = self.snapshots.commit_of(repo, f"refs/heads/{branch}")
        self.app.worktrees.delete_branch(repo, branch)
        self.app.direct.write(
            lambda tx: st.record_event(
                tx, GC, task_id=c.id, attempt_id=c.attempt_id, branch=branch, head=head
            )
        )
        self.report.branches.append(branch)

    def _keep(self, task_id: int | None, reason: str) -> None:
        self.report.kept.append(Kept(task_id, reason))

    # -- orphans --------------------------------------------------------------------------

    def orphan(self, path: Path, before: float) -> None:
        """A task directory no task owns: snapshot in its own repository, then remove."""
        if not _inside(path, self.root):
            self._keep(None, f"{path} is outside worktree_root; not touched")
            return
        main = self.snapshots.main_worktree(path)
        if main is None:
            self._keep(None, f"orphan {path} is not a git worktree; left alone")
            return
        size, newest, nested = disk_usage(path)
        if newest >= before:
            return  # changed recently: maybe someone's work in progress
        if nested:
            self._keep(None, _nested(path, nested))
            return
        if self.options.dry_run:
            unreferenced = self._unreferenced(path, main, "orphan")
            if unreferenced is not None:
                self._keep(None, unreferenced)
                return
            dirty = self.snapshots.is_dirty(path)
            ref = orphan_ref(path.name) if dirty else None
            self.report.removed.append(Removed(None, str(path), ref, size))
            return
        try:
            with path_guard(self.app, str(path), timeout=GUARD_SECONDS):
                self._remove_orphan(path, main, size)
        except LockHeld:
            self._keep(None, f"orphan {path} is being collected by another gc")
        except Exception as exc:  # as for tasks: the next orphan all the same
            self._keep(None, f"orphan {path} not collected: {_describe(exc)}")

    def _remove_orphan(self, path: Path, main: Path, size: int) -> None:
        if not os.path.lexists(path):
            return  # another gc took it
        in_use = self.app.direct.read(live_worktrees)
        if any(_same(path, p) for p in in_use):
            self._keep(None, f"orphan {path} is used by a running attempt")
            return
        if self.snapshots.is_locked(path):
            self._keep(None, f"orphan {path} is locked (git worktree lock); left alone")
            return
        unreferenced = self._unreferenced(path, main, "orphan")
        if unreferenced is not None:
            self._keep(None, unreferenced)
            return
        ref = commit = None
        if self.snapshots.is_dirty(path):
            saved = self.snapshots.save(path, orphan_ref(path.name), f"dispatch gc: {path}")
            ref, commit = saved.ref, saved.commit
        head = self.snapshots.head(path)
        trash = _rename_aside(path)
        self.app.worktrees.remove(main, path)
        self.app.direct.write(
            lambda tx: st.record_event(
                tx,
                GC,
                task_id=None,
                worktree=str(path),
                repo=str(main),
                ref=ref,
                commit=commit,
                head=head,
                bytes=size,
                orphan=True,
            )
        )
        self.report.removed.append(Removed(None, str(path), ref, size))
        if trash is not None:
            _delete(trash, self.report)


def _in_use(tx: Tx, c: GcCandidate, path: Path) -> str | None:
    """Why the task's worktree must stay, read afresh inside the guard; None if it may go."""
    try:
        task = st.get_task(tx, c.id)
    except DispatchError:
        return "the task is gone"
    if task.status in (Status.IN_PROGRESS.value, Status.READY.value):
        return f"task is {task.status} now"
    if task.worktree is None or not _same(Path(task.worktree), path):
        return "its worktree changed since gc looked"
    for worktree, task_id in live_worktrees(tx).items():
        if task_id == c.id or _same(Path(worktree), path):
            return f"worktree {path} is used by a running attempt of task {task_id}"
    return None


def _describe(exc: Exception) -> str:
    return exc.message if isinstance(exc, DispatchError) else f"{type(exc).__name__}: {exc}"


def _nested(path: Path, nested: list[str]) -> str:
    # A snapshot records a nested repository as a commit id, never its files or their
    # changes: removing the worktree would delete them.
    return f"worktree {path} holds git repositories ({nested[0]}); left alone"


def _same(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _message(c: GcCandidate) -> str:
    # Ids only: a title is user text, and a commit message is no place to quote it.
    return f"dispatch gc: task {c.id} attempt {c.attempt_id} ({c.status})"


def _rename_aside(path: Path) -> Path | None:
    """Move the worktree away from its path in one step; None when it cannot be
    renamed (then `remove` deletes it in place, its snapshot already written)."""
    trash = path.parent / f"{_TRASH}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except OSError:
        return None
    return trash
