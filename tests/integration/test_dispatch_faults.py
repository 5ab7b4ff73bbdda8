"""Dispatch as a compensating transaction: a fault at every step leaves nothing behind.

Faults are injected at the seams (a real GitWorktrees or TmuxTerminal with one method
replaced; the prompt-file writer and the record step patched in the module), against
real git, a real tmux server and a real wrapper process. After every fault the task is
back where it was, says why, and no branch, worktree or window of the attempt is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from dispatch.adapters.git import GitWorktrees
from dispatch.adapters.tmux import TmuxTerminal
from dispatch.app import App
from dispatch.cli import main as cli_main
from dispatch.cli.context import Invocation
from dispatch.errors import DispatchFailed, DispatchInterrupted, EnvironmentProblem
from dispatch.lifecycle import AttemptState
from dispatch.services import dispatching
from dispatch.services.dispatching import dispatch_task, redispatch
from dispatch.services.saga import Step
from dispatch.services.tasks import add_task, reset_task
from dispatch.store import statements as st
from dispatch.store.direct import Direct, SqliteExecutor, Tx
from tests.conftest import Env, tmux, windows
from tests.faults import (
    Faulty,
    agent_profile,
    assert_nothing_left,
    assert_rolled_back,
    attempts,
    branches,
    committer_profile,
    events,
    fails_from_call,
    raises,
    returns,
    spawns_instead,
    task,
    tool_failed,
    wait_for,
    wait_status,
    works_then_raises,
    worktree_list,
    write_config,
)

TITLE = "Fix the parser"
BRANCH = "dispatch/1-fix-the-parser"


@pytest.fixture
def session(env: Env) -> list[str]:
    """The dispatch session already runs, with a user's window and a look-alike in it.

    The look-alike's command ends in `agent-exec 12`, which contains `agent-exec 1`:
    an undo that matched loosely would kill it.
    """
    started = tmux(env, "new-session", "-d", "-s", "dispatch", "-n", "user", "sleep", "600")
    assert started.returncode == 0, started.stderr
    decoy = tmux(
        env,
        "new-window",
        "-d",
        "-t",
        "=dispatch:",
        "-n",
        "decoy",
        "sh",
        "-c",
        "sleep 600",
        "agent-exec",
        "12",
    )
    assert decoy.returncode == 0, decoy.stderr
    return ["user", "decoy"]


def real_git(env: Env) -> GitWorktrees:
    return GitWorktrees(env.home / "locks")


def real_tmux(env: Env) -> TmuxTerminal:
    return TmuxTerminal(env.socket)


def replace_step(monkeypatch: pytest.MonkeyPatch, name: str, action: Callable[..., object]) -> None:
    steps = [s if s.name != name else Step(name, action, s.undo) for s in dispatching.STEPS]
    assert steps != dispatching.STEPS
    monkeypatch.setattr(dispatching, "STEPS", steps)


@dataclass
class Case:
    """One fault: at `step`, of `kind`, built by `inject(monkeypatch, env)` -> adapters."""

    step: str
    kind: str
    inject: Callable[[pytest.MonkeyPatch, Env], dict[str, Any]]
    reason: str  # a piece of the error the user sees
    agent: str = "sleeper"
    via_cli: bool = False
    agent_started: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def _git(**faults: Any) -> Callable[[pytest.MonkeyPatch, Env], dict[str, Any]]:
    return lambda _mp, env: {"worktrees": Faulty(real_git(env), **faults)}


def _tmux(**faults: Any) -> Callable[[pytest.MonkeyPatch, Env], dict[str, Any]]:
    return lambda _mp, env: {"terminal": Faulty(real_tmux(env), **faults)}


def _prompt_writer(fault: Callable[[Path, str], None]) -> Callable[..., dict[str, Any]]:
    def inject(mp: pytest.MonkeyPatch, _env: Env) -> dict[str, Any]:
        mp.setattr(dispatching, "_write_prompt_file", fault)
        return {}

    return inject


def _record(fault: Callable[[dispatching.Dispatch], object]) -> Callable[..., dict[str, Any]]:
    def inject(mp: pytest.MonkeyPatch, _env: Env) -> dict[str, Any]:
        replace_step(mp, "record", fault)
        return {}

    return inject


def _no_space(_path: Path, _text: str) -> None:
    raise OSError(28, "No space left on device")


_REAL_PROMPT_WRITER = dispatching._write_prompt_file


def _written_then_failed(path: Path, text: str) -> None:
    _REAL_PROMPT_WRITER(path, text)
    raise OSError(5, "Input/output error")


def _not_written(_path: Path, _text: str) -> None:
    return None


def _record_raises(exc: BaseException) -> Callable[[dispatching.Dispatch], object]:
    def record(_d: dispatching.Dispatch) -> object:
        raise exc

    return record


def _record_says_no(d: dispatching.Dispatch) -> object:
    return False


CASES = [
    Case(
        "worktree",
        "exception",
        _git(add=raises(RuntimeError("no space left on device"))),
        "no space left on device",
    ),
    # git exits non-zero after making both the branch and the worktree (a failing hook).
    Case(
        "worktree",
        "exit",
        _git(
            add=works_then_raises(tool_failed("git worktree", "error: post-checkout hook failed"))
        ),
        "post-checkout hook failed",
        via_cli=True,
    ),
    Case("worktree", "false success", _git(add=returns(True)), "is not there"),
    Case("prompt file", "exception", _prompt_writer(_no_space), "No space left on device"),
    Case(
        "prompt file",
        "exit",
        _prompt_writer(_written_then_failed),
        "Input/output error",
        via_cli=True,
    ),
    Case("prompt file", "false success", _prompt_writer(_not_written), "did not do its work"),
    Case("spawn", "exception", _tmux(spawn=raises(RuntimeError("tmux crashed"))), "tmux crashed"),
    # tmux made the window (running the wrapper), then exited non-zero.
    Case(
        "spawn",
        "exit",
        _tmux(spawn=works_then_raises(tool_failed("tmux new-window", "lost server"))),
        "lost server",
        via_cli=True,
    ),
    Case("spawn", "false success", _tmux(spawn=returns("@999")), "no such window"),
    Case("spawn", "false success (no id)", _tmux(spawn=returns("")), "did not do its work"),
    # tmux breaks while the dispatcher waits (spawn's own check is the first call).
    Case(
        "confirm",
        "exception",
        _tmux(window_exists=fails_from_call(2, RuntimeError("tmux hung"))),
        "tmux hung",
    ),
    # The window's program exits non-zero without ever acknowledging.
    Case(
        "confirm",
        "exit",
        _tmux(spawn=spawns_instead(["sh", "-c", "sleep 1; exit 3"])),
        "window closed before the agent wrapper started",
    ),
    # The real wrapper gives up: the agent's command is not there.
    Case(
        "confirm",
        "exit (wrapper gives up)",
        lambda _mp, _env: {},
        "agent command 'no-such-agent-xyz' not found",
        agent="missing",
        via_cli=True,
    ),
    # A window that runs, but not the wrapper: no acknowledgement ever comes.
    Case(
        "confirm",
        "false success",
        _tmux(spawn=spawns_instead(["sleep", "60"])),
        "no acknowledgement from the agent wrapper within 2s",
    ),
    Case(
        "record",
        "exception",
        _record(_record_raises(RuntimeError("record broke"))),
        "record broke",
        agent_started=True,
    ),
    Case(
        "record",
        "exit",
        _record(_record_raises(EnvironmentProblem("database x: database is locked"))),
        "database is locked",
        agent_started=True,
        via_cli=True,
    ),
    Case(
        "record",
        "false success",
        _record(_record_says_no),
        "did not do its work",
        agent_started=True,
    ),
]


def _add(app: App, repo: Path, agent: str = "sleeper", title: str = TITLE) -> int:
    return add_task(
        app, title, prompt="Make the parser accept empty input.", repo=repo, agent=agent
    ).id


def _dispatch_via_cli(
    app: App, task_id: int, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """The real CLI entry point, in this process so that it uses the faulty adapters."""
    monkeypatch.setattr(Invocation, "app", lambda _self: app)
    capsys.readouterr()
    code = cli_main.run(["run", str(task_id)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[f"{c.step}-{c.kind}" for c in CASES])
def test_a_fault_at_any_step_rolls_everything_back(
    case: Case,
    env: Env,
    repo: Path,
    session: list[str],
    make_app: Callable[..., App],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_config(env, agent_profile("missing", ["no-such-agent-xyz", "{prompt}"]), spawn_timeout=2)
    adapters = case.inject(monkeypatch, env)
    app = make_app(**adapters)
    task_id = _add(app, repo, case.agent)

    if case.via_cli:
        code, stderr = _dispatch_via_cli(app, task_id, monkeypatch, capsys)
        assert code == 6, stderr
        message = stderr
        assert message.startswith(f"dispatch: error: dispatch of task 1 failed at {case.step}: ")
    else:
        with pytest.raises(DispatchFailed) as caught:
            dispatch_task(app, task_id)
        assert caught.value.exit_code == 6
        message = caught.value.message
        assert message.startswith(f"dispatch of task 1 failed at {case.step}: ")
    assert case.reason in message
    assert "rolled back, task is ready" in message

    attempt = assert_rolled_back(env, task_id, "ready", step=case.step)
    assert case.reason in attempt["error"]
    assert_nothing_left(env, repo, task_id)
    assert sorted(windows(env)) == sorted(session)  # the user's windows were not touched
    # The write-ahead intent says what was about to be made, and that none of it existed.
    intent = attempt["intent"]
    if case.step != "worktree" or case.kind != "exception":
        assert intent["branch"] == BRANCH
        assert intent["worktree"] == str(env.home.resolve() / "worktrees" / "repo" / "task-1")
        assert intent["branch_existed"] is False
        assert intent["worktree_existed"] is False
    if case.step in ("spawn", "confirm", "record"):
        assert intent["session"] == "dispatch"
        assert intent["window_name"] == "t1"
    if case.agent_started:
        # The wrapper was running when the dispatcher rolled back: it may record its own
        # exit (a late exit), but never the task's status.
        wait_for(lambda: events(env, task_id, "late-exit"), "the wrapper's late exit")
        assert task(env, task_id)["status"] == "ready"
        assert attempts(env, task_id)[-1]["outcome"] == "dispatch-failed"
    assert task(env, task_id)["dispatch_failures"] == 1


def test_intent_is_written_before_each_action(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    """Write-ahead: git and tmux are only called once the attempt row says what they make."""
    write_config(env)
    seen: dict[str, dict[str, Any]] = {}

    def intent_now() -> dict[str, Any]:
        return dict(attempts(env, 1)[-1]["intent"])

    def add(real: Callable[..., bool], *args: Any, **kwargs: Any) -> bool:
        seen["add"] = intent_now()
        return real(*args, **kwargs)

    def spawn(real: Callable[..., str], *args: Any, **kwargs: Any) -> str:
        seen["spawn"] = intent_now()
        real(*args, **kwargs)
        raise tool_failed("tmux new-window", "lost server")

    app = make_app(
        worktrees=Faulty(real_git(env), add=add), terminal=Faulty(real_tmux(env), spawn=spawn)
    )
    _add(app, repo)
    with pytest.raises(DispatchFailed):
        dispatch_task(app, 1)
    worktree = str(env.home.resolve() / "worktrees" / "repo" / "task-1")
    assert seen["add"] == {
        "repo": str(repo),
        "base": "main",
        "branch": BRANCH,
        "branch_existed": False,
        "worktree": worktree,
        "worktree_existed": False,
    }
    assert seen["spawn"] == {**seen["add"], "session": "dispatch", "window_name": "t1"}
    assert intent_now() == seen["spawn"]  # still there after the rollback, for the record
    assert_nothing_left(env, repo, 1)


class _ProbedDirect:
    """A `Direct` that tells the probe while one of its write transactions is open."""

    def __init__(self, real: Direct, open_writes: set[int]) -> None:
        self.real = real
        self.open_writes = open_writes

    def read(self, work: Callable[[Tx], Any]) -> Any:
        return self.real.read(work)

    def write(self, work: Callable[[Tx], Any]) -> Any:
        def tracked(tx: Tx) -> Any:
            self.open_writes.add(id(self))
            try:
                return work(tx)
            finally:
                self.open_writes.discard(id(self))

        return self.real.write(tracked)

    def version(self) -> Hashable | None:
        return self.real.version()

    def close(self) -> None:
        self.real.close()


class _WriteLockProbe:
    """Fails the test if a git or tmux call happens while this process has a write open.

    The wrapper (another process) writes too, so the database lock itself says nothing
    about the dispatcher: the probe follows this process's transactions instead.
    """

    def __init__(self) -> None:
        self.open_writes: set[int] = set()
        self.checked: list[str] = []
        self.violations: list[str] = []

    def watch(self, app: App) -> None:
        app.db.ensure_schema()  # so that the statements go the direct way
        app.direct_ = _ProbedDirect(app.direct, self.open_writes)

    def wrap(self, real: Any) -> Faulty:
        names = [n for n in dir(real) if not n.startswith("_") and callable(getattr(real, n))]
        return Faulty(real, **{n: self._probe(n) for n in names})

    def _probe(self, name: str) -> Callable[..., Any]:
        def call(real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            self.checked.append(name)
            if self.open_writes:
                self.violations.append(name)
            return real(*args, **kwargs)

        return call


def test_no_write_transaction_is_held_across_git_or_tmux_calls(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    write_config(env)
    probe = _WriteLockProbe()
    app = make_app(worktrees=probe.wrap(real_git(env)), terminal=probe.wrap(real_tmux(env)))
    probe.watch(app)
    _add(app, repo)
    result = dispatch_task(app, 1)
    assert result is not None
    assert result.task.status == "in-progress"
    assert result.attempt.state == "running"
    assert {"branch_exists", "add", "spawn", "window_exists"} <= set(probe.checked)
    assert probe.violations == []


@pytest.mark.sqlite_only  # the probe watches SQLite's one write lock
def test_the_probe_sees_a_write_held_across_a_call(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    """The probe above can fail: a git call made inside a write transaction is caught."""
    write_config(env)
    probe = _WriteLockProbe()
    app = make_app(worktrees=probe.wrap(real_git(env)))
    probe.watch(app)
    _add(app, repo)

    def git_inside_a_write(tx: Tx) -> None:
        st.get_task(tx, 1)
        app.worktrees.branch_exists(repo, "main")

    assert isinstance(app.direct, _ProbedDirect) and isinstance(app.direct.real, SqliteExecutor)
    app.direct.write(git_inside_a_write)
    app.direct.read(lambda tx: app.worktrees.has_changes(repo))  # reading holds no lock
    assert probe.violations == ["branch_exists"]


def test_an_undo_that_fails_is_reported_and_does_not_hide_the_error(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    write_config(env)
    app = make_app(
        worktrees=Faulty(real_git(env), remove=raises(tool_failed("git worktree", "fatal: busy"))),
        terminal=Faulty(real_tmux(env), spawn=raises(RuntimeError("tmux crashed"))),
    )
    _add(app, repo)
    with pytest.raises(DispatchFailed) as caught:
        dispatch_task(app, 1)
    message = caught.value.message
    assert message.startswith("dispatch of task 1 failed at spawn: tmux crashed; ")
    assert "undo problems: undo worktree: git worktree: fatal: busy" in message
    assert_rolled_back(env, 1, "ready", step="spawn")
    assert task(env, 1)["last_error"] == "spawn: tmux crashed"
    failed = events(env, 1, "dispatch-failed")[-1]
    assert failed["detail"]["undo_errors"] == ["undo worktree: git worktree: fatal: busy"]
    # The worktree the failed undo could not remove is still there, and said so.
    assert (env.home / "worktrees" / "repo" / "task-1").is_dir()


def test_ctrl_c_during_git_worktree_add_is_undone(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    write_config(env)
    app = make_app(
        worktrees=Faulty(real_git(env), add=works_then_raises(KeyboardInterrupt())),
    )
    _add(app, repo)
    with pytest.raises(DispatchInterrupted) as caught:
        dispatch_task(app, 1)
    assert caught.value.exit_code == 6
    assert "failed at worktree: interrupted by SIGINT" in caught.value.message
    assert_rolled_back(env, 1, "ready", step="worktree")
    assert_nothing_left(env, repo, 1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_right_after_the_claim_commits_is_undone(
    env: Env,
    repo: Path,
    make_app: Callable[..., App],
    monkeypatch: pytest.MonkeyPatch,
    signum: signal.Signals,
) -> None:
    """The signal lands once the claim's transaction has committed, before the dispatch
    knows its attempt: the claim is rolled back all the same, never left in-progress."""
    write_config(env)
    app = make_app()
    _add(app, repo)
    real_claim = dispatching._claim_named

    def claim_then_signal(*args: Any) -> Any:
        claimed = real_claim(*args)
        signal.raise_signal(signum)
        return claimed

    monkeypatch.setattr(dispatching, "_claim_named", claim_then_signal)
    with pytest.raises(DispatchInterrupted) as caught:
        dispatch_task(app, 1)
    assert f"failed at claim: interrupted by {signum.name}" in caught.value.message
    assert caught.value.message.endswith("rolled back, task is ready")
    assert_rolled_back(env, 1, "ready", step="claim")
    assert [e["kind"] for e in events(env, 1)] == ["created", "claimed", "dispatch-failed"]
    assert_nothing_left(env, repo, 1)
    monkeypatch.setattr(dispatching, "_claim_named", real_claim)
    assert dispatch_task(app, 1) is not None  # nothing is left holding the task


def test_failures_are_capped_and_a_success_or_reset_clears_the_count(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    """After max_dispatch_failures consecutive failures a task is parked in `failed`."""
    write_config(env, max_dispatch_failures=3)
    broken = make_app(terminal=Faulty(real_tmux(env), spawn=raises(RuntimeError("no tmux"))))
    working = make_app()
    _add(broken, repo)

    def fail_once() -> None:
        with pytest.raises(DispatchFailed):
            dispatch_task(broken, 1)

    fail_once()
    fail_once()
    assert task(env, 1)["status"] == "ready"
    assert task(env, 1)["dispatch_failures"] == 2
    # A successful spawn clears the count.
    assert dispatch_task(working, 1) is not None
    assert task(env, 1)["dispatch_failures"] == 0
    subprocess.run(["tmux", "-L", env.socket, "kill-window", "-t", "=dispatch:t1"], check=True)
    assert wait_status(env, 1) == "interrupted"
    assert (
        subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "worktree",
                "remove",
                "--force",
                str(env.home / "worktrees" / "repo" / "task-1"),
            ]
        ).returncode
        == 0
    )
    reset_task(working, 1)
    for expected in ("ready", "ready", "failed"):
        fail_once()
        assert task(env, 1)["status"] == expected
    assert task(env, 1)["dispatch_failures"] == 3
    last = events(env, 1, "dispatch-failed")[-1]
    assert (last["to_status"], last["detail"]["failures"]) == ("failed", 3)
    assert task(env, 1)["last_error"] == "spawn: no tmux"
    # `reset` clears the count: the next failure returns the task to ready again.
    reset_task(working, 1)
    assert task(env, 1)["dispatch_failures"] == 0
    fail_once()
    assert task(env, 1)["status"] == "ready"


def test_a_failed_redispatch_keeps_the_existing_worktree_branch_and_user_work(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    write_config(env, agent_profile("quitter", ["sh", "-c", "exit 1"]))
    working = make_app()
    _add(working, repo, agent="quitter")
    first = dispatch_task(working, 1)
    assert first is not None
    assert wait_status(env, 1) == "failed"
    worktree = Path(first.attempt.worktree or "")
    (worktree / "notes.txt").write_text("my uncommitted work\n")
    (worktree / "README.md").write_text("edited by the user\n")

    broken = make_app(
        terminal=Faulty(real_tmux(env), spawn=works_then_raises(tool_failed("tmux", "lost")))
    )
    with pytest.raises(DispatchFailed) as caught:
        redispatch(broken, 1)
    assert "failed at spawn" in caught.value.message
    assert "task is failed" in caught.value.message
    second = assert_rolled_back(env, 1, "failed", step="spawn")
    assert second["redispatch_of"] == first.attempt.id
    assert second["intent"]["worktree_existed"] is True
    assert second["intent"]["branch_existed"] is True
    assert (worktree / "notes.txt").read_text() == "my uncommitted work\n"
    assert (worktree / "README.md").read_text() == "edited by the user\n"
    assert BRANCH in branches(repo)
    assert worktree_list(repo) == [str(worktree)]
    assert "t1" not in windows(env)


def test_a_failed_redispatch_removes_a_worktree_it_made_but_keeps_the_branch(
    env: Env, repo: Path, make_app: Callable[..., App], git: Callable[..., str]
) -> None:
    """The user removed the worktree after a failure; the branch (with a commit) stays."""
    write_config(env, committer_profile())
    working = make_app()
    _add(working, repo, agent="committer")
    first = dispatch_task(working, 1)
    assert first is not None
    assert wait_status(env, 1) == "failed"
    head = git(repo, "rev-parse", BRANCH).strip()
    git(repo, "worktree", "remove", first.attempt.worktree or "")

    broken = make_app(terminal=Faulty(real_tmux(env), spawn=returns("")))
    with pytest.raises(DispatchFailed):
        redispatch(broken, 1)
    second = assert_rolled_back(env, 1, "failed", step="spawn")
    assert second["intent"]["worktree_existed"] is False
    assert second["intent"]["branch_existed"] is True
    assert worktree_list(repo) == []
    assert not Path(first.attempt.worktree or "").exists()
    assert git(repo, "rev-parse", BRANCH).strip() == head


def test_a_worktree_path_taken_by_something_else_is_left_alone(
    env: Env, repo: Path, make_app: Callable[..., App]
) -> None:
    write_config(env)
    app = make_app()
    _add(app, repo)
    squatter = env.home / "worktrees" / "repo" / "task-1"
    squatter.mkdir(parents=True)
    (squatter / "precious.txt").write_text("not a worktree\n")
    with pytest.raises(DispatchFailed) as caught:
        dispatch_task(app, 1)
    assert "is not a worktree of" in caught.value.message
    assert_rolled_back(env, 1, "ready", step="worktree")
    assert (squatter / "precious.txt").read_text() == "not a worktree\n"
    assert BRANCH not in branches(repo)


def test_another_tasks_worktree_at_the_path_is_not_taken_over(
    env: Env, repo: Path, make_app: Callable[..., App], git: Callable[..., str]
) -> None:
    """Task 1 of another database had this path: its worktree, on its own branch, is not
    this task 1's to switch or use; the message says whose it likely is."""
    write_config(env)
    app = make_app()
    _add(app, repo)
    theirs = env.home / "worktrees" / "repo" / "task-1"
    git(repo, "worktree", "add", "-q", "-b", "dispatch/1-their-task", str(theirs))
    (theirs / "their-work.txt").write_text("theirs\n")
    with pytest.raises(DispatchFailed) as caught:
        dispatch_task(app, 1)
    assert f"worktree {theirs} is on dispatch/1-their-task and was never this task's" in (
        caught.value.message
    )
    assert "switch" not in caught.value.message  # no hint that would take it over
    assert_rolled_back(env, 1, "ready", step="worktree")
    assert (theirs / "their-work.txt").read_text() == "theirs\n"
    assert git(theirs, "symbolic-ref", "--short", "HEAD").strip() == "dispatch/1-their-task"
    assert BRANCH not in branches(repo)


def test_the_json_error_of_a_failed_dispatch(
    env: Env,
    repo: Path,
    make_app: Callable[..., App],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_config(env)
    app = make_app(terminal=Faulty(real_tmux(env), spawn=returns("")))
    _add(app, repo)
    monkeypatch.setattr(Invocation, "app", lambda _self: app)
    capsys.readouterr()
    assert cli_main.run(["run", "1", "--json"]) == 6
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["code"] == 6
    assert error["kind"] == "dispatch-failed"
    assert error["message"].startswith("dispatch of task 1 failed at spawn: ")
    assert "task is ready" in error["message"]


def test_an_acknowledgement_landing_at_the_deadline_wins_over_giving_up(
    env: Env, repo: Path, make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly one side decides: the dispatcher's give-up is conditional on `starting`."""
    write_config(env, spawn_timeout=1)
    real_give_up = dispatching._give_up

    def acknowledged_just_before(tx: Tx, attempt_id: int) -> bool:
        # The wrapper's two writes commit first (same transaction: same order).
        assert st.move_attempt(
            tx, attempt_id, expected=[AttemptState.STARTING], target=AttemptState.RUNNING
        )
        st.update_attempt(tx, attempt_id, agent_pid=os.getpid())
        return real_give_up(tx, attempt_id)

    monkeypatch.setattr(dispatching, "_give_up", acknowledged_just_before)
    app = make_app(terminal=Faulty(real_tmux(env), spawn=spawns_instead(["sleep", "60"])))
    _add(app, repo)
    result = dispatch_task(app, 1)
    assert result is not None
    assert (result.attempt.state, result.attempt.outcome) == ("running", None)
    assert task(env, 1)["status"] == "in-progress"
    assert events(env, 1, "dispatch-failed") == []
    assert windows(env) == ["t1"]
