"""`dispatch run` and `dispatch redispatch`: one compensating transaction (SPEC §3).

claim -> worktree -> prompt file -> spawn -> confirm -> record. Every step's undo is
registered before it acts and every external action is preceded by a write-ahead
intent on the attempt row, so a sweep can finish the undo of a dispatcher that died.
"""

from __future__ import annotations

import functools
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from dispatch.adapters.protocols import Worktrees
from dispatch.adapters.wakeup import Waiter, address, listen
from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.errors import (
    Conflict,
    DispatchError,
    DispatchFailed,
    DispatchInterrupted,
    DispatchRolledBack,
    EnvironmentProblem,
    NotFound,
    UsageError,
)
from dispatch.lifecycle import RETRYABLE, Action, AttemptState, Outcome, Status, next_status
from dispatch.services.cleanup import kill_attempt_windows, remove_created, remove_prompt, roll_back
from dispatch.services.intent import Intent
from dispatch.services.naming import (
    branch_name,
    prompt_path,
    window_name,
    worktree_path,
    wrapper_argv,
)
from dispatch.services.saga import (
    NO_WORK,
    Saga,
    Step,
    StepFailed,
    describe,
    signals_held,
    signals_interrupt,
)
from dispatch.store import statements as st
from dispatch.store.direct import Tx
from dispatch.store.statements import AttemptRow, TaskRow, list_tasks

# How often confirm reads whether the wrapper acknowledged: a read costs about a millisecond,
# and every `dispatch run` waits for this.
POLL_SECONDS = 0.02
# With the wrapper's nudge (adapters.wakeup), how long confirm waits for one at most
# before it looks anyway.
NUDGED_POLL_SECONDS = 0.1
# How often confirm asks tmux whether the window is still there.
WINDOW_CHECK_SECONDS = 0.25


@dataclass
class Dispatch:
    """What one dispatch is asked to do, and, once the claim has committed, what it
    claimed; the saga's context."""

    app: App
    task_id: int | None
    action: Action = Action.CLAIM
    redispatch_of: int | None = None
    # `run --next`: tasks this run already tried, so one broken task is not retried at once.
    exclude: frozenset[int] = frozenset()
    # The attempt number the caller last saw (the monitor's page): the claim is refused
    # when the task has moved on since, checked in the read its write is guarded by.
    expected_attempt: int | None = None
    claimed: Claimed | None = None
    warnings: list[str] = field(default_factory=list)
    # What an undo deliberately left in place (work the agent already made).
    kept: list[str] = field(default_factory=list)

    @property
    def attempt_id(self) -> int | None:
        return None if self.claimed is None else self.claimed.attempt_id


@dataclass
class Claimed:
    """What every step after the claim works on: the task and attempt the claim made,
    and what the steps learn as they go."""

    app: App
    action: Action
    task: TaskRow
    attempt_id: int
    number: int  # the attempt's, among the task's
    prior: Status
    worktree: Path
    branch: str  # the task's branch; a move to another host may give it a new one
    warnings: list[str]
    kept: list[str]
    window_id: str | None = None
    intent: Intent = field(default_factory=Intent)
    # A new conversation's session id, recorded as the task's with the first intent.
    new_session: str | None = None


@dataclass
class DispatchResult:
    task: TaskRow
    attempt: AttemptRow
    warnings: list[str]
    # Every attempt of the task, oldest first (SPEC §5: `run` shows them with the task).
    attempts: list[AttemptRow] = field(default_factory=list)


# -- steps --------------------------------------------------------------------------------


def claim(d: Dispatch) -> bool:
    """Task -> in-progress and a `starting` attempt, in one write transaction.

    The task moves by one conditional UPDATE; the context learns the attempt only once
    the transaction has committed, so a failed claim can never fence or roll back a row
    it did not make (SQLite may hand the same id to the next writer).

    Every claimer waits for SQLite's one write lock, so the transaction holds it for a
    fixed few statements: what needs no lock (settings, the profile, the clock, the
    session id, for a named task its checks and names) is done before it is taken.

    A host without git or tmux is refused before anything is claimed (exit 7): no
    step could work, and a rollback would count the host's problem as the task's failure.
    """
    d.app.worktrees.require()
    d.app.terminal.require()
    fixed = _claim_values(d)
    # A signal between the commit and learning the attempt would leave a claim nobody
    # knows to undo: held until the attempt is known, then the undos run as after any step.
    picked = d.task_id is None
    with signals_held():
        if d.task_id is None:
            claimed = d.app.direct.write(lambda tx: _claim_next(tx, d, fixed))
        else:
            claimed = _claim_named(d, d.task_id, fixed)
        if claimed is not None:
            d.task_id, d.claimed = claimed.task.id, claimed
    if claimed is not None and picked and claimed.number > 1:
        # Picked inside the claim's transaction, too late to refuse: a failed dispatch,
        # undone, and `run --next` goes on to the next task. (A first attempt has no
        # earlier one whose processes could still run.)
        task_id, attempt_id = claimed.task.id, claimed.attempt_id
        last = d.app.direct.read(lambda tx: st.latest_attempt(tx, task_id, before=attempt_id))
        _refuse_while_alive(d.app, task_id, last)
    return claimed is not None


def _after_claim(step: Callable[[Claimed], bool]) -> Callable[[Dispatch], bool]:
    """A step that runs on what the claim made (the saga runs it only after the claim)."""

    @functools.wraps(step)
    def run(d: Dispatch) -> bool:
        if d.claimed is None:
            raise DispatchError(f"{step.__name__} before the claim")
        return step(d.claimed)

    return run


def _undo_after_claim(undo: Callable[[Claimed], None]) -> Callable[[Dispatch], None]:
    @functools.wraps(undo)
    def run(d: Dispatch) -> None:
        if d.claimed is not None:
            undo(d.claimed)

    return run


@dataclass(frozen=True)
class _ClaimValues:
    """What every claim writes that does not depend on the task."""

    worktree_root: Path
    attempt: dict[str, Any]


def _claim_values(d: Dispatch) -> _ClaimValues:
    settings = d.app.settings
    now = utcnow()
    attempt = {
        "state": AttemptState.STARTING.value,
        "host": settings.host,
        "dispatcher_pid": os.getpid(),
        "tmux_session": settings.tmux_session,
        "tmux_socket": settings.tmux_socket,
        "intent": {},
        "lease_expires_at": now + timedelta(seconds=settings.lease_seconds),
        "started_at": now,
        "session_id": str(uuid.uuid4()),  # kept only where the task has none to resume
    }
    return _ClaimValues(_resolved(settings.worktree_root), attempt)


@functools.lru_cache(maxsize=8)
def _resolved(path: Path) -> Path:
    """`worktree_root` as a real path: resolved once a process, not on every claim."""
    return path.expanduser().resolve()


@dataclass(frozen=True)
class _Plan:
    """A claim of one task, checked and named; `task` is the row it was checked on."""

    task: TaskRow
    current: Status
    target: Status
    resume: bool
    worktree: Path
    branch: str


def _plan(d: Dispatch, task: TaskRow, fixed: _ClaimValues) -> _Plan:
    """The lifecycle's and the profile's checks of a claim, and the names it gives."""
    current = Status(task.status)
    target = next_status(current, d.action, closed=task.closed_at is not None, task_id=task.id)
    profile = d.app.settings.agent(task.agent)  # an unknown profile refuses before anything
    return _Plan(
        task,
        current,
        target,
        d.action is Action.REDISPATCH and profile.resume is not None,
        worktree_path(fixed.worktree_root, task.repo, task.id),
        task.branch or branch_name(task.id, task.title),
    )


# How often a claim of a named task is tried again when the task changed between its
# check and the write lock (another writer got there first): then it is checked again.
_CLAIM_TRIES = 5


class _Changed(Exception):
    """The task changed since it was checked: the transaction is rolled back."""


def _claim_named(d: Dispatch, task_id: int, fixed: _ClaimValues) -> Claimed:
    """Checked from a read, then written only if the task is still as it was read."""

    def check(tx: Tx) -> tuple[TaskRow, AttemptRow | None]:
        task = st.get_task(tx, task_id)
        if d.expected_attempt is not None:
            st.expect_latest_attempt(tx, task, d.expected_attempt)
        if task.status == Status.IN_PROGRESS.value:
            raise _running_conflict(tx, task)
        return task, st.latest_attempt(tx, task_id)

    for _ in range(_CLAIM_TRIES):
        task, last = d.app.direct.read(check)
        plan = _plan(d, task, fixed)
        if not os.path.isdir(task.repo):
            # On a fleet, most likely a task for another host: refused before anything is
            # made, as `run --next` passes it over (SPEC §10).
            raise EnvironmentProblem(
                f"task {task_id}: its repository {task.repo} is not on this host "
                f"({d.app.settings.host})",
                hint="run it on a host that has the repository",
            )
        # Before anything is made. A redispatch's task keeps its status through a cancel,
        # which stops them; a ready one would be cancelled.
        _refuse_while_alive(d.app, task_id, last, cancel=d.action is Action.REDISPATCH)
        try:
            return d.app.direct.write(functools.partial(_write_claim, d=d, plan=plan, fixed=fixed))
        except _Changed:
            continue
    raise Conflict(f"task {task_id} changed while claiming it; try again")


def _claim_next(tx: Tx, d: Dispatch, fixed: _ClaimValues) -> Claimed | None:
    settings = d.app.settings
    if settings.max_running and st.count_in_progress(tx) >= settings.max_running:
        raise Conflict(f"{settings.max_running} tasks already running (max_running)")
    task = _pick(tx, d, settings.agents)
    if task is None:
        return None  # nothing ready: a falsy claim, which `run --next` expects
    try:
        return _write_claim(tx, d, _plan(d, task, fixed), fixed)
    except _Changed:  # not under SQLite's lock; PostgreSQL holds the row: cannot happen
        raise Conflict(f"task {task.id} changed while claiming it; try again") from None


def _write_claim(tx: Tx, d: Dispatch, plan: _Plan, fixed: _ClaimValues) -> Claimed:
    """The claim's writes: the attempt, the task (only if unchanged since `plan` was
    made) and the event, three statements; and for a redispatch the session it resumes.

    `run` starts over with a new conversation (print-mode agents refuse to reuse an
    old one's id): its session is known without reading, so it is recorded with the
    worktree's intent, still before anything could start the agent, and out of the
    write lock every claimer waits for.
    """
    task = plan.task
    st.lock_task(tx, task.id)
    session_id = fixed.attempt["session_id"]
    if d.action is Action.REDISPATCH:
        session_id = _use_session(tx, task, session_id, renew=False)
    attempt_id, number = st.insert_next_attempt(
        tx,
        **{**fixed.attempt, "session_id": session_id},
        task_id=task.id,
        prior_status=plan.current.value,
        worktree=str(plan.worktree),
        branch=plan.branch,
        resume=plan.resume,
        redispatch=d.action is Action.REDISPATCH,
        redispatch_of=d.redispatch_of,
    )
    if not st.move_task(
        tx,
        task.id,
        expected=plan.current,
        target=plan.target,
        unchanged_since=task.updated_at,
        current_attempt_id=attempt_id,
    ):
        raise _Changed
    kind = "redispatched" if d.action is Action.REDISPATCH else "claimed"
    st.record_event(
        tx,
        kind,
        task_id=task.id,
        attempt_id=attempt_id,
        from_status=plan.current,
        to_status=plan.target,
    )
    return Claimed(
        d.app,
        d.action,
        task,
        attempt_id,
        number,
        plan.current,
        plan.worktree,
        plan.branch,
        d.warnings,
        d.kept,
        new_session=None if d.action is Action.REDISPATCH else session_id,
    )


def _use_session(tx: Tx, task: TaskRow, fresh_id: str, *, renew: bool) -> str:
    """The session id the task's attempt uses: its stored one, else (or, renewing) `fresh_id`."""
    return st.use_agent_session(
        tx,
        f"{task.agent}:{task.repo}:{task.id}",
        task_id=task.id,
        agent=task.agent,
        fresh_id=fresh_id,
        renew=renew,
    )


# How many tasks whose agent profile is unknown one `--next` claim marks as skipped.
_MARK_AT_MOST = 20


def _pick(tx: Tx, d: Dispatch, agents: Mapping[str, object]) -> TaskRow | None:
    """The next ready task `--next` can start on this host (SPEC §10). Ones before it
    whose agent profile no longer exists are passed over, with their `last_error`
    saying so; ones whose repository is not on this host are passed over silently (it
    may be on another host): neither must block the queue behind them."""
    absent: set[str] = set()
    while True:
        task = st.next_ready(tx, d.exclude, absent_repos=absent)
        if task is not None and task.agent not in agents:
            task = st.next_ready(tx, d.exclude, agents, absent)
            for task_id, agent in st.ready_without_profile(tx, agents, task, _MARK_AT_MOST):
                st.update_task(tx, task_id, last_error=f"{st.SKIPPED_PROFILE} {agent!r}; skipped")
        if task is None or os.path.isdir(task.repo):
            return task  # the usual case: one statement
        absent.add(task.repo)  # one more statement per repository missing here


def _running_conflict(tx: Tx, task: TaskRow) -> Conflict:
    attempt = st.latest_attempt(tx, task.id)
    where = ""
    if attempt is not None:
        window = f" in {attempt.tmux_target}" if attempt.tmux_target else ""
        where = f" (attempt {attempt.id} {attempt.state}{window})"
    return Conflict(
        f"task {task.id} is {task.status}{where}",
        hint=f"`dispatch cancel {task.id}` first, or wait for it",
    )


def _write_intent(c: Claimed, columns: dict[str, Any] | None = None, **intent: Any) -> None:
    """Record what the next action is about to create, renewing the lease as we go."""
    c.intent = replace(c.intent, **intent)
    lease = utcnow() + timedelta(seconds=c.app.settings.lease_seconds)
    values = {**(columns or {}), "intent": c.intent.stored(), "lease_expires_at": lease}
    attempt_id, task, session = c.attempt_id, c.task, c.new_session

    def work(tx: Tx) -> None:
        st.update_attempt(tx, attempt_id, **values)
        # Only while the attempt is the task's: one reaped or cancelled meanwhile must not
        # replace the session its successor resumes with one that never ran.
        if session is not None and st.get_task(tx, task.id).current_attempt_id == attempt_id:
            _use_session(tx, task, session, renew=True)

    c.app.direct.write(work)
    c.new_session = None


def make_worktree(c: Claimed) -> bool:
    """Create (or, for a redispatch, reuse) the task's branch and worktree."""
    if c.task.worktree is None:
        return _make_worktree(c)  # a first dispatch: there is nothing gc could have taken
    # `dispatch gc` may be collecting this worktree right now, or may have: under its
    # guard, bring back what it collected first, so the agent finds its work.
    from dispatch.services.guards import task_guard
    from dispatch.services.restore import restore_collected

    with task_guard(c.app, c.task.id):
        if restore_collected(c.app, c.task, c.attempt_id):
            c.warnings.append(f"worktree {c.task.worktree} had been collected; restored it")
        return _make_worktree(c)


def _make_worktree(c: Claimed) -> bool:
    git, repo = c.app.worktrees, Path(c.task.repo)
    branch_existed = git.branch_exists(repo, c.branch)
    registered = git.is_worktree(repo, c.worktree)
    if registered and not c.worktree.exists():
        # Its directory was deleted by hand: a stale entry holding no work, which would
        # make git refuse to check the branch out again.
        git.remove(repo, c.worktree)
        registered = False
    worktree_existed = registered or c.worktree.exists()
    start, moved, switched_from = c.task.base_ref, None, None
    columns: dict[str, Any] = {}
    moved_from = _moved_from(c)
    if moved_from is not None and not worktree_existed:
        moved = _branch_for_this_host(c, git, repo, moved_from, branch_existed=branch_existed)
    elif moved_from is not None and registered:
        # Back on a host whose worktree of the task is still there, on the branch it had
        # here, while the task's branch moved on and is checked out on the other host:
        # this worktree goes on a new branch from that branch's tip (SPEC §10). Only
        # from a branch: a detached HEAD's commits would be left to the reflog, and it
        # could not be switched back.
        head = git.head_ref(c.worktree)
        holder = git.branch_holder(repo, c.branch) if branch_existed else None
        on_a_branch = head != c.branch and git.branch_exists(repo, head)
        if on_a_branch and holder is not None and holder != c.worktree:
            if git.has_changes(c.worktree):
                raise DispatchError(
                    f"worktree {c.worktree} has uncommitted changes on {head}, and the "
                    f"task's branch {c.branch} is checked out at {holder} (commit them to "
                    f"{head} or remove them, then redispatch: a new branch starts from "
                    f"{c.branch}'s tip, without them)"
                )
            moved = _branch_for_this_host(c, git, repo, moved_from, branch_existed=True)
            switched_from = head
    if moved is not None:
        start = moved["commit"]
        branch_existed = git.branch_exists(repo, c.branch)
        columns["branch"] = c.branch
    if moved_from is not None and _attempt(c).resume:
        # The agent's session (its conversation store) stays on the host that ran it.
        columns["resume"] = False
        c.warnings.append(f"the agent's last session is on {moved_from}; starting it afresh")
    _write_intent(
        c,
        columns,
        repo=str(repo),
        # What the branch started from: an undo keeps it only for commits made since.
        base=start,
        branch=c.branch,
        branch_existed=branch_existed,
        worktree=str(c.worktree),
        worktree_existed=worktree_existed,
        switched_from=switched_from,
    )
    if moved is not None:
        _record_branched(c, moved)
    if switched_from is not None:
        c.warnings.append(f"worktree {c.worktree} was on {switched_from}; it is on {c.branch} now")
        # A successor an earlier undo kept (it has that attempt's commits) is taken up.
        if not git.switch(repo, c.worktree, c.branch, None if branch_existed else start):
            return False
    if worktree_existed:
        if not git.is_worktree(repo, c.worktree):
            raise DispatchError(f"{c.worktree} exists and is not a worktree of {repo}")
        exists = branch_existed or switched_from is not None
        _check_on_branch(git, repo, c.worktree, c.branch, exists=exists, had=c.task.worktree)
        if git.has_changes(c.worktree):
            c.warnings.append(f"worktree {c.worktree} has uncommitted changes; they are kept")
        return True
    if not git.add(repo, c.worktree, c.branch, start, new_branch=not branch_existed):
        return False
    # Trust what is there, not what the adapter said: a spawn into a missing directory
    # would otherwise fail later, or worse, start the agent somewhere else. (The adapter
    # read git's own list to say so; a worktree's `.git` file is what there is to see.)
    if not (c.worktree.is_dir() and (c.worktree / ".git").is_file()):
        raise DispatchError(f"git reported worktree {c.worktree} made, but it is not there")
    return True


def _moved_from(c: Claimed) -> str | None:
    """The host of the task's attempt before this one, when that is another host."""
    if c.task.branch is None:
        return None  # a first dispatch: nothing ran anywhere else
    task_id, attempt_id = c.task.id, c.attempt_id

    def work(tx: Tx) -> str | None:
        # An attempt rolled back (or refused) on its way in leaves the task where the
        # one before it left it: the host of that one is where the task's branch is.
        earlier = [
            a
            for a in st.attempts_of(tx, task_id)
            if a.id < attempt_id and a.outcome != Outcome.DISPATCH_FAILED.value
        ]
        return earlier[-1].host if earlier else None

    previous = c.app.direct.read(work)
    return previous if previous is not None and previous != c.app.settings.host else None


def _branch_for_this_host(
    c: Claimed, git: Worktrees, repo: Path, previous: str, *, branch_existed: bool
) -> dict[str, Any] | None:
    """SPEC §10: the branch a task moved from another host works on here, or None when
    the task's branch can simply be checked out (or made) as on its own host.

    The other host's worktree is never touched: it is that host's to keep or collect.
    Where the branch is checked out there (a shared repository), this attempt works on
    a new branch from its tip; where this host's repository lacks it (a clone of its
    own), the branch starts from `base_ref` here.
    """
    held = git.branch_holder(repo, c.branch) if branch_existed else None
    if not branch_existed:
        reason = f"branch {c.branch} is not in this host's repository {repo}"
        start, commit = c.task.base_ref, c.task.base_ref
    elif held is None:
        return None  # the branch is free: this host checks it out, as its own host would
    else:
        reason = f"branch {c.branch} is checked out at {held} (host {previous})"
        start, commit = c.branch, git.branch_tip(repo, c.branch)
        c.branch = f"{branch_name(c.task.id, c.task.title)}-{c.number}"
        holder = git.branch_holder(repo, c.branch)
        if holder is not None:
            raise DispatchError(
                f"{reason}, and its successor {c.branch} is checked out at {holder}"
            )
    c.warnings.append(f"{reason}; working on {c.branch} from {start}")
    return {
        "reason": reason,
        "branch": c.branch,
        "started_from": start,
        "commit": commit,
        "from_host": previous,
        "host": c.app.settings.host,
    }


def _record_branched(c: Claimed, moved: dict[str, Any]) -> None:
    """The event that says which branch the task now works on, and why."""
    task_id, attempt_id = c.task.id, c.attempt_id
    c.app.direct.write(
        lambda tx: st.record_event(tx, "branched", task_id=task_id, attempt_id=attempt_id, **moved)
    )


def _check_on_branch(
    git: Worktrees, repo: Path, worktree: Path, branch: str, *, exists: bool, had: str | None
) -> None:
    """A reused worktree must be on the task's branch: on a detached HEAD, or on a branch
    that was deleted, the agent's commits would belong to no branch (and `completion =
    "commits"` could never be met). Refused, not repaired: which commit is right is the
    user's call."""
    head = git.head_ref(worktree)
    if exists and head == branch:
        return
    holder = git.branch_holder(repo, branch) if exists else None
    if holder is not None:
        # Another host's worktree of a shared repository, most likely: this one cannot
        # take the branch; without it, the attempt starts a new branch from its tip.
        raise DispatchError(
            f"worktree {worktree}: it is on {head}, and the task's branch {branch} is "
            f"checked out at {holder} (`git worktree remove {worktree}` once its work is "
            "safe, then redispatch: a new branch starts from that branch's tip)"
        )
    if had is None and head != branch:
        # Never this task's: another task's worktree at the same path (the same id in
        # another database, most likely). Switching it would take that task's work.
        raise DispatchError(
            f"worktree {worktree} is on {head} and was never this task's (another task's, "
            "perhaps of another database, at the same path): move it away, or give this "
            "database its own worktree_root"
        )
    if not exists:
        state = f"its branch {branch} was deleted"
        fix = f"`git -C {worktree} switch -c {branch}`"
    else:
        state = f"it is on {head}, not on {branch}"
        fix = f"`git -C {worktree} switch {branch}`"
    # The hint goes in the message: a failed step reports its error's message alone.
    raise DispatchError(f"worktree {worktree}: {state} ({fix}, then redispatch)")


def undo_worktree(c: Claimed) -> None:
    """Remove what this attempt created, never what existed before or holds work."""
    if c.intent.worktree is None:
        return
    c.kept.extend(remove_created(c.app, c.intent, agent_started=_agent_started(c)))


def _attempt(c: Claimed) -> AttemptRow:
    attempt_id = c.attempt_id
    return c.app.direct.read(lambda tx: st.get_attempt(tx, attempt_id))


def _agent_started(c: Claimed) -> bool:
    return _attempt(c).agent_pid is not None


def _write_prompt_file(path: Path, text: str) -> None:
    """Write the prompt, readable by its owner only: prompts can hold secrets."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(text.encode("utf-8"))


def write_prompt(c: Claimed) -> bool:
    """The prompt file for `{prompt_file}` profiles, checked byte for byte once written."""
    path = prompt_path(c.app, c.attempt_id)
    _write_prompt_file(path, c.task.prompt)
    try:
        return path.read_bytes() == c.task.prompt.encode("utf-8")
    except FileNotFoundError:
        return False


def undo_prompt(c: Claimed) -> None:
    remove_prompt(c.app, c.attempt_id)


def spawn(c: Claimed) -> bool:
    """Open the task's tmux window running the wrapper; the window id is recorded."""
    settings = c.app.settings
    _write_intent(c, session=settings.tmux_session, window_name=window_name(c.task.id))
    env = wrapper_env(c.app)
    terminal = c.app.terminal
    c.window_id = terminal.spawn(
        settings.tmux_session, window_name(c.task.id), wrapper_argv(c.attempt_id), c.worktree, env
    )
    if not c.window_id:
        return False
    target = f"{settings.tmux_session}:{c.window_id}"
    _write_intent(c, {"tmux_target": target}, window_id=c.window_id)
    # A window id is a claim, not proof. A missing window is a false report unless the
    # wrapper was already there and gave its verdict (then confirm reads it).
    if not terminal.window_exists(c.window_id) and _attempt(c).state == AttemptState.STARTING:
        raise DispatchError(f"tmux reported window {c.window_id}, but no such window exists")
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


def undo_spawn(c: Claimed) -> None:
    terminal = c.app.terminal
    if c.window_id:
        terminal.kill_window(c.window_id)
    # A spawn that failed after creating the window never told us its id: find it by marker.
    kill_attempt_windows(terminal, c.app.settings.tmux_session, c.attempt_id)


def confirm(c: Claimed) -> bool:
    """Wait for the wrapper's acknowledgement (starting -> running, agent pid recorded).

    Exactly one side decides whether the spawn happened: the wrapper by moving the
    attempt to `running`, or this dispatcher, past `spawn_timeout`, by ending it while
    it is still `starting`. Whichever conditional update lands first wins.
    """
    assert c.window_id  # spawn, the step before, recorded it or failed
    # Listening before the first look: a nudge sent after it is never missed.
    waiter = listen(address(c.app.settings.database, c.attempt_id))
    try:
        return _confirm(c, waiter)
    finally:
        if waiter is not None:
            waiter.close()


def _confirm(c: Claimed, waiter: Waiter | None) -> bool:
    assert c.window_id
    app, attempt_id, window = c.app, c.attempt_id, c.window_id
    timeout = app.settings.spawn_timeout
    deadline = time.monotonic() + timeout
    # spawn saw the window just now: the first look is due a period from now
    next_window_check = time.monotonic() + WINDOW_CHECK_SECONDS
    while True:
        attempt = _attempt(c)
        if _started(attempt):
            # Gone without a recorded exit (re-read: the exit may land just before it closes).
            if (
                attempt.exit_code is None
                and not app.terminal.window_exists(window)
                and _attempt(c).exit_code is None
            ):
                raise DispatchError("the agent's window closed without recording its exit")
            return True
        now = time.monotonic()
        if now >= next_window_check:
            next_window_check = now + WINDOW_CHECK_SECONDS
            if not app.terminal.window_exists(window):
                # The wrapper may have recorded its verdict just before its window closed.
                if _started(_attempt(c)):
                    return True
                raise DispatchError("the tmux window closed before the agent wrapper started")
        if now >= deadline:
            if attempt.state == AttemptState.RUNNING:
                # Acknowledged: the wrapper decided the spawn happened and is starting the
                # agent; give it one more timeout to record the agent's pid.
                if now >= deadline + timeout:
                    raise DispatchError(
                        f"the agent wrapper acknowledged but did not start the agent within "
                        f"{2 * timeout:g}s"
                    )
            elif app.direct.write(lambda tx: _give_up(tx, attempt_id)):
                raise DispatchError(
                    f"no acknowledgement from the agent wrapper within {timeout:g}s"
                )
        if waiter is None:
            time.sleep(POLL_SECONDS)
        else:
            # Woken by the wrapper's nudge as soon as it has written; else look again
            # when the window is due a check.
            waiter.wait(min(max(next_window_check - time.monotonic(), 0.0), NUDGED_POLL_SECONDS))


def _started(attempt: AttemptRow) -> bool:
    """Whether the wrapper started the agent; raises if it gave up instead."""
    if attempt.agent_pid is not None:
        return True  # a quick agent may already have exited: it still started
    if attempt.state == AttemptState.ENDED:
        raise DispatchError(attempt.error or "the agent wrapper gave up before starting the agent")
    return False


def _give_up(tx: Tx, attempt_id: int) -> bool:
    """End a still-`starting` attempt; a late wrapper then finds it ended and leaves."""
    return st.end_failed_dispatch(tx, attempt_id, expected=[AttemptState.STARTING])


def record(c: Claimed) -> bool:
    """The dispatch succeeded: clear the failure count, note where the task lives.

    A quick agent may already have finished and recorded its outcome; that still counts.
    False only when the attempt was ended by someone else (reaped) before it could run.
    """
    task_id, attempt_id = c.task.id, c.attempt_id

    def work(tx: Tx) -> bool:
        attempt = st.get_attempt(tx, attempt_id)
        ran = attempt.state == AttemptState.RUNNING.value or attempt.exit_code is not None
        if not ran:
            return False
        values: dict[str, Any] = {
            "dispatch_failures": 0,
            "branch": c.branch,
            "worktree": str(c.worktree),
        }
        st.update_task(tx, task_id, **values)
        # Only while the attempt is still the task's: a quick agent's own error must stay.
        # One conditional statement, not a read then a write: on PostgreSQL the wrapper's
        # exit may commit between the two, and its error would be overwritten.
        tx.change(
            "UPDATE tasks SET last_error = NULL WHERE id = :id AND current_attempt_id = :attempt",
            {"id": task_id, "attempt": attempt_id},
        )
        # (Its `dispatched` event was recorded by the wrapper with the agent's pid.)
        st.update_attempt(tx, attempt_id, lease_expires_at=None)
        return True

    return c.app.direct.write(work)


STEPS: list[Step[Dispatch]] = [
    Step("claim", claim, atomic=True),
    Step("worktree", _after_claim(make_worktree), _undo_after_claim(undo_worktree)),
    Step("prompt file", _after_claim(write_prompt), _undo_after_claim(undo_prompt)),
    Step("spawn", _after_claim(spawn), _undo_after_claim(undo_spawn)),
    Step("confirm", _after_claim(confirm)),
    Step("record", _after_claim(record)),
]


# -- failure handling -----------------------------------------------------------------------


def fence(d: Dispatch) -> None:
    """End the attempt first, so a wrapper that is still starting can no longer touch the task."""
    if d.attempt_id is None:
        return
    attempt_id = d.attempt_id
    live = [AttemptState.STARTING, AttemptState.RUNNING]
    d.app.direct.write(lambda tx: st.end_failed_dispatch(tx, attempt_id, expected=live))


def _on_failure(d: Dispatch, failure: StepFailed) -> None:
    if d.attempt_id is None:
        return
    error = f"{failure.step}: {failure.reason}"
    detail: dict[str, Any] = {"step": failure.step}
    if failure.undo_errors:
        detail["undo_errors"] = list(failure.undo_errors)
    if d.kept:
        detail["kept"] = list(d.kept)
    roll_back(d.app, d.attempt_id, error, detail)


# -- use cases ------------------------------------------------------------------------------


def dispatch_task(
    app: App,
    task_id: int | None,
    *,
    action: Action = Action.CLAIM,
    redispatch_of: int | None = None,
    exclude: frozenset[int] = frozenset(),
    expected_attempt: int | None = None,
) -> DispatchResult | None:
    """Run the saga for one task (`task_id` None: the highest-priority ready task).

    None only when `task_id` is None and no task is ready (outside `exclude`).
    """
    d = Dispatch(
        app,
        task_id,
        action=action,
        redispatch_of=redispatch_of,
        exclude=exclude,
        expected_attempt=expected_attempt,
    )
    saga: Saga[Dispatch] = Saga(STEPS)
    try:
        with signals_interrupt():
            saga.run(d, fence=fence, on_failure=lambda f: _on_failure(d, f))
    except StepFailed as failure:
        if failure.step == "claim" and failure.cause == NO_WORK and d.attempt_id is None:
            return None  # --next: nothing ready
        cause = failure.cause
        if failure.step == "claim" and isinstance(cause, DispatchError) and d.attempt_id is None:
            raise cause from None  # a refusal (conflict, closed, unknown): nothing made
        raise _failed(app, d, failure) from None
    assert d.attempt_id is not None
    attempt_id = d.attempt_id

    def load(tx: Tx) -> DispatchResult:
        attempt = st.get_attempt(tx, attempt_id)
        attempts = st.attempts_of(tx, attempt.task_id)
        return DispatchResult(st.get_task(tx, attempt.task_id), attempt, d.warnings, attempts)

    return app.direct.read(load)


def _failed(app: App, d: Dispatch, failure: StepFailed) -> DispatchRolledBack:
    """The one-line report: which step, why, and what the task is now."""
    status = "unknown"
    if d.task_id is not None:
        task_id = d.task_id
        try:
            status = app.direct.read(lambda tx: st.get_task(tx, task_id).status)
        except DispatchError as exc:
            status = f"unknown ({describe(exc)})"
    notes = ""
    if d.kept:
        notes += f"; {'; '.join(d.kept)}"
    if failure.undo_errors:
        notes += f"; undo problems: {'; '.join(failure.undo_errors)}"
    name = f"task {d.task_id}" if d.task_id is not None else "the next task"
    kind = DispatchInterrupted if failure.interrupted else DispatchRolledBack
    return kind(
        f"dispatch of {name} failed at {failure.step}: {failure.reason}; "
        f"rolled back, task is {status}{notes}",
        task_id=d.task_id,
        step=failure.step,
    )


@dataclass
class RunNext:
    """What `run --next` did: dispatches and failures in order, and why it stopped early."""

    results: list[DispatchResult | DispatchFailed] = field(default_factory=list)
    stopped: str | None = None
    # When nothing was started: why the ready tasks there are could not be, one line each.
    passed_over: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[DispatchFailed]:
        return [r for r in self.results if isinstance(r, DispatchFailed)]

    @property
    def started(self) -> list[DispatchResult]:
        return [r for r in self.results if isinstance(r, DispatchResult)]


def run_next(app: App, limit: int, *, reap: bool = True) -> RunNext:
    """Dispatch up to `limit` of the highest-priority ready tasks, within max_running.

    A task whose dispatch fails is not tried again in the same run: a broken task must
    not use up its whole failure allowance at once, nor block the tasks behind it.
    """
    if reap:
        # Imported here: `run TASK`, which every benchmark of a dispatch times, needs neither.
        from dispatch.services.sweep import reconcile

        reconcile(app)  # a dead agent's task must not count against max_running
    run = RunNext()
    tried: set[int] = set()
    while len(run.results) < limit:
        try:
            result = dispatch_task(app, None, exclude=frozenset(tried))
        except DispatchInterrupted as exc:
            run.results.append(exc)
            run.stopped = "interrupted"
            break
        except DispatchRolledBack as exc:
            run.results.append(exc)
            if exc.task_id is not None:
                tried.add(exc.task_id)
            continue
        except Conflict as exc:
            run.stopped = exc.message  # max_running reached
            break
        if result is None:
            break
        tried.add(result.task.id)
        run.results.append(result)
    if not run.results and run.stopped is None:
        run.passed_over = _passed_over(app, tried)
    return run


def _passed_over(app: App, tried: set[int]) -> list[str]:
    """Why each ready task `run --next` found is not one it can start on this host: its
    agent profile is not in the config, or its repository is not here (SPEC §10)."""
    agents = app.settings.agents
    reasons = []
    for agent, repo, count, first in app.direct.read(lambda tx: st.ready_groups(tx, tried)):
        which = f"task {first}" if count == 1 else f"{count} tasks, the first {first}"
        if agent not in agents:
            reasons.append(f"{which}: agent profile {agent!r} is not in the config")
        elif not os.path.isdir(repo):
            reasons.append(f"{which}: repository {repo} is not on this host")
    return reasons


def redispatch(
    app: App,
    task_id: int | None = None,
    attempt_id: int | None = None,
    *,
    expected_attempt: int | None = None,
) -> DispatchResult:
    """A fresh attempt after a failure, reusing the worktree and resuming the session;
    with `expected_attempt`, only if the task's latest attempt still is that one."""
    previous: int | None = None
    if attempt_id is not None:
        attempt = app.direct.read(lambda tx: st.get_attempt(tx, attempt_id))
        task_id, previous = attempt.task_id, attempt.id
        if expected_attempt is None:
            # Only the latest attempt can be the one a new attempt follows: an older one
            # would be recorded as its `redispatch_of`, a history that never happened.
            expected_attempt = attempt.number
    if task_id is None:
        raise NotFound("give a task id or --attempt")
    result = dispatch_task(
        app,
        task_id,
        action=Action.REDISPATCH,
        redispatch_of=previous,
        expected_attempt=expected_attempt,
    )
    assert result is not None
    return result


def _refuse_while_alive(
    app: App, task_id: int, latest: AttemptRow | None, *, cancel: bool = False
) -> None:
    """A second agent must never work in the worktree while the last one's processes run
    (a wrapper killed outright leaves an agent that ignores hangups running): a task
    reset or redispatched since is refused until they are gone. `latest` is the task's
    last attempt before the one being claimed."""
    from dispatch.services.control import leftovers

    alive = leftovers(app, latest)  # a running one is refused by the claim, its window named
    if latest is not None and alive:
        pids = " ".join(map(str, sorted(alive)))
        raise Conflict(
            f"task {task_id}: processes {pids} of attempt {latest.id} are still running "
            "in its worktree",
            hint=f"wait for them to exit, or stop them: `dispatch cancel {task_id}`"
            if cancel
            else f"wait for them to exit, or stop them: kill {pids} (kill -9 if they ignore it)",
        )


def retryable_task_ids(app: App, statuses: list[str]) -> list[int]:
    """Open tasks in the given retryable statuses, oldest first: what a bulk redispatch takes."""
    wanted = sorted(set(statuses))
    for status in wanted:
        if status not in {s.value for s in RETRYABLE}:
            allowed = ", ".join(sorted(s.value for s in RETRYABLE))
            raise UsageError(f"cannot redispatch {status!r} tasks (only {allowed})")
    return [t.id for t in app.direct.read(lambda tx: list_tasks(tx, wanted))]


def redispatch_each(
    app: App, task_ids: list[int]
) -> Iterator[tuple[int, DispatchResult | DispatchError]]:
    """Redispatch tasks one by one through the same saga; a failure does not stop the rest."""
    for task_id in task_ids:
        try:
            yield task_id, redispatch(app, task_id)
        except DispatchInterrupted as exc:
            yield task_id, exc
            return
        except DispatchError as exc:
            yield task_id, exc
