"""A redispatch on another host than the previous attempt's (SPEC §10), with real git.

Two "hosts" on this machine: each its own `DISPATCH_HOST` and `worktree_root`, one
database. With one shared repository the branch stays checked out in the first host's
worktree, so the new attempt works on a new branch from its tip; with a clone per host
the branch is not there at all, so it starts from `base_ref`. Either way the first
host's worktree is left exactly as it was.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dispatch.app import App
from dispatch.config import load_settings
from dispatch.errors import DispatchRolledBack
from dispatch.services.dispatching import redispatch
from tests.conftest import BASE_CONFIG, Env, Result
from tests.faults import (
    Fault,
    Faulty,
    committer_profile,
    raises,
    returns,
    tool_failed,
    wait_for,
    works_then_raises,
)


@dataclass
class Host:
    name: str
    config: Path
    worktree_root: Path

    @property
    def environ(self) -> dict[str, str]:
        return {"DISPATCH_HOST": self.name, "DISPATCH_CONFIG": str(self.config)}


def _host(env: Env, name: str) -> Host:
    root = env.root / f"{name}-worktrees"
    config = env.root / f"{name}.toml"
    # On the host that ran it, a redispatch would resume; elsewhere there is no session.
    resume = 'resume = ["sh", "-c", "echo resumed >> work.txt; exit 1"]\n'
    text = BASE_CONFIG + f'worktree_root = "{root}"\n' + committer_profile() + resume
    config.write_text(text, encoding="utf-8")
    return Host(name, config, root)


def _on(cli: Callable[..., Result], host: Host, *args: str, cwd: Path | None = None) -> Result:
    return cli(*args, cwd=cwd, extra_env=host.environ)


def _show(cli: Callable[..., Result], host: Host, task_id: int = 1) -> dict[str, Any]:
    shown = _on(cli, host, "show", str(task_id), "--json")
    assert shown.code == 0, shown.stderr
    data: dict[str, Any] = shown.json()
    return data


def _settled(cli: Callable[..., Result], host: Host, attempts: int) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        data = _show(cli, host)
        done = len(data["attempts"]) == attempts and data["status"] != "in-progress"
        return data if done else None

    return wait_for(probe, f"attempt {attempts} to end")


def _files(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): p.read_text()
        for p in sorted(path.rglob("*"))
        if p.is_file() and ".git" not in p.relative_to(path).parts
    }


def _failed_on(cli: Callable[..., Result], host: Host, repo: Path) -> dict[str, Any]:
    """Task 1 run on host: its agent commits a line and exits 1."""
    assert _on(cli, host, "add", "job", "--agent", "committer", "--prompt", "p", cwd=repo).code == 0
    ran = _on(cli, host, "run", "1")
    assert ran.code == 0, ran.stderr
    shown = _settled(cli, host, 1)
    assert shown["status"] == "failed"
    return shown


def _moved(cli: Callable[..., Result], a: Host, b: Host, repo: Path) -> Path:
    """Task 1 failed on `a`, then redispatched on `b` (a shared repository: onto a new
    branch) and ended there; `a`'s worktree of it, which is still on the first branch."""
    old_worktree = Path(_failed_on(cli, a, repo)["attempts"][0]["worktree"])
    assert _on(cli, b, "redispatch", "1").code == 0
    _settled(cli, b, 2)
    return old_worktree


def _redispatch_failing(
    host: Host,
    monkeypatch: pytest.MonkeyPatch,
    step: str = "spawn",
    *,
    git: dict[str, Fault] | None = None,
    tmux: dict[str, Fault] | None = None,
) -> None:
    """Task 1 redispatched on `host` with faults in git or tmux (by default, a tmux
    whose new-window fails): rolled back at `step`."""
    for key, value in host.environ.items():
        monkeypatch.setenv(key, value)
    if git is None and tmux is None:
        tmux = {"spawn": raises(tool_failed("tmux"))}
    base = App(load_settings())
    app = App(
        load_settings(),
        worktrees_=Faulty(base.worktrees, **(git or {})),
        terminal_=Faulty(base.terminal, **(tmux or {})),
    )
    try:
        with pytest.raises(DispatchRolledBack, match=f"failed at {step}"):
            redispatch(app, 1)
    finally:
        app.close()
        base.close()


def _once(fault: Fault) -> Fault:
    """`fault` on the first call only: the undo's own calls then work."""
    calls: list[None] = []

    def once(real: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return fault(real, *args, **kwargs) if len(calls) == 1 else real(*args, **kwargs)

    return once


@pytest.fixture
def hosts(env: Env) -> tuple[Host, Host]:
    return _host(env, "host-a"), _host(env, "host-b")


def test_a_shared_repository_gets_a_new_branch_from_the_held_branch_tip(
    cli: Callable[..., Result], repo: Path, git: Callable[..., str], hosts: tuple[Host, Host]
) -> None:
    a, b = hosts
    first = _failed_on(cli, a, repo)["attempts"][0]
    old_worktree = Path(first["worktree"])
    assert old_worktree.parent.parent == a.worktree_root
    assert first["host"] == "host-a" and first["branch"] == "dispatch/1-job"
    before = _files(old_worktree)
    old_tip = git(repo, "rev-parse", "dispatch/1-job").strip()

    moved = _on(cli, b, "redispatch", "1", "--json")

    assert moved.code == 0, moved.stderr
    attempt = moved.json()["attempt"]
    assert attempt["host"] == "host-b"
    assert attempt["branch"] == "dispatch/1-job-2"
    assert Path(attempt["worktree"]) == b.worktree_root / "repo" / "task-1"
    assert "checked out at" in moved.stderr  # the user is told, not only the log
    assert "last session is on host-a; starting it afresh" in moved.stderr
    shown = _settled(cli, b, 2)
    assert shown["status"] == "failed"  # the committer fails again, after its commit
    assert shown["branch"] == "dispatch/1-job-2"  # the task's branch now
    assert shown["worktree"] == attempt["worktree"]
    (branched,) = [e for e in shown["events"] if e["kind"] == "branched"]
    assert branched["attempt_id"] == attempt["id"]
    assert branched["detail"]["started_from"] == "dispatch/1-job"
    assert branched["detail"]["commit"] == old_tip
    assert branched["detail"]["from_host"] == "host-a"
    assert str(old_worktree) in branched["detail"]["reason"]
    # Started from the held branch's tip: the first attempt's commit, then its own.
    log = git(Path(attempt["worktree"]), "log", "--format=%s", "main..HEAD").split()
    assert log == ["work", "work"]
    assert (Path(attempt["worktree"]) / "work.txt").read_text() == "work\nwork\n"
    # The first host's worktree and branch are as that host left them.
    assert _files(old_worktree) == before
    assert git(old_worktree, "branch", "--show-current").strip() == "dispatch/1-job"
    assert git(repo, "rev-parse", "dispatch/1-job").strip() == old_tip

    # Back on the first host: its worktree there is on the old branch, and the task's
    # branch is held on host-b. The worktree goes on a new branch from that tip.
    again = _on(cli, a, "redispatch", "1", "--json")
    assert again.code == 0, again.stderr
    back = again.json()["attempt"]
    assert back["host"] == "host-a" and back["branch"] == "dispatch/1-job-3"
    assert Path(back["worktree"]) == old_worktree
    assert f"dispatch/1-job-2 is checked out at {attempt['worktree']}" in again.stderr
    assert "was on dispatch/1-job; it is on dispatch/1-job-3 now" in again.stderr
    shown = _settled(cli, a, 3)
    assert shown["branch"] == "dispatch/1-job-3"
    assert [e["detail"]["started_from"] for e in shown["events"] if e["kind"] == "branched"] == [
        "dispatch/1-job",
        "dispatch/1-job-2",
    ]
    # All three attempts' commits, in order, on the branch the task has now.
    log = git(old_worktree, "log", "--format=%s", "main..HEAD").split()
    assert log == ["work", "work", "work"]
    assert git(repo, "rev-parse", "dispatch/1-job").strip() == old_tip  # left as it was
    assert _files(Path(attempt["worktree"])) == {"README.md": "hello\n", "work.txt": "work\nwork\n"}


def test_a_host_back_with_uncommitted_changes_is_refused_and_keeps_them(
    cli: Callable[..., Result], repo: Path, git: Callable[..., str], hosts: tuple[Host, Host]
) -> None:
    a, b = hosts
    old_worktree = _moved(cli, a, b, repo)
    (old_worktree / "notes.txt").write_text("mine\n")
    before = _files(old_worktree)

    again = _on(cli, a, "redispatch", "1")

    assert again.code == 6, again.stderr
    assert f"worktree {old_worktree} has uncommitted changes on dispatch/1-job" in again.stderr
    assert _files(old_worktree) == before
    assert git(old_worktree, "branch", "--show-current").strip() == "dispatch/1-job"
    assert not git(repo, "branch", "--list", "dispatch/1-job-3").strip()
    assert _show(cli, a)["branch"] == "dispatch/1-job-2"

    # Once they are out of the way, the next redispatch there is not stuck behind the
    # refused one: the task's branch is still on host-b.
    (old_worktree / "notes.txt").unlink()
    after = _on(cli, a, "redispatch", "1", "--json")
    assert after.code == 0, after.stderr
    assert after.json()["attempt"]["branch"] == "dispatch/1-job-4"
    assert git(old_worktree, "branch", "--show-current").strip() == "dispatch/1-job-4"


def test_a_detached_worktree_is_not_switched(
    cli: Callable[..., Result], repo: Path, git: Callable[..., str], hosts: tuple[Host, Host]
) -> None:
    a, b = hosts
    old_worktree = _moved(cli, a, b, repo)
    git(old_worktree, "switch", "--detach", "HEAD")
    head = git(old_worktree, "rev-parse", "HEAD").strip()

    again = _on(cli, a, "redispatch", "1")

    assert again.code == 6, again.stderr
    assert f"worktree {old_worktree}: it is on {head}" in again.stderr
    assert git(old_worktree, "rev-parse", "HEAD").strip() == head
    assert git(old_worktree, "branch", "--show-current").strip() == ""
    assert not git(repo, "branch", "--list", "dispatch/1-job-3").strip()


def test_a_failed_switch_back_puts_the_worktree_on_its_old_branch(
    cli: Callable[..., Result],
    repo: Path,
    git: Callable[..., str],
    hosts: tuple[Host, Host],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = hosts
    old_worktree = _moved(cli, a, b, repo)
    before = _files(old_worktree)
    _redispatch_failing(a, monkeypatch)

    assert git(old_worktree, "branch", "--show-current").strip() == "dispatch/1-job"
    assert _files(old_worktree) == before
    assert not git(repo, "branch", "--list", "dispatch/1-job-3").strip()
    assert _show(cli, a)["branch"] == "dispatch/1-job-2"

    retried = _on(cli, a, "redispatch", "1", "--json")
    assert retried.code == 0, retried.stderr
    assert retried.json()["attempt"]["branch"] == "dispatch/1-job-4"


def test_a_failed_move_removes_only_what_it_made(
    env: Env,
    cli: Callable[..., Result],
    repo: Path,
    git: Callable[..., str],
    hosts: tuple[Host, Host],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = hosts
    first = _failed_on(cli, a, repo)["attempts"][0]
    old_worktree = Path(first["worktree"])
    before = _files(old_worktree)
    _redispatch_failing(b, monkeypatch)

    shown = _show(cli, b)
    assert shown["status"] == "failed"
    assert shown["branch"] == "dispatch/1-job"  # the move did not happen
    assert [e["kind"] for e in shown["events"]][-2:] == ["branched", "dispatch-failed"]
    assert not (b.worktree_root / "repo" / "task-1").exists()
    branches = git(repo, "branch", "--format=%(refname:short)").split()
    assert sorted(branches) == ["dispatch/1-job", "main"]  # its new branch is gone
    worktrees = git(repo, "worktree", "list", "--porcelain")
    assert str(old_worktree) in worktrees and str(b.worktree_root) not in worktrees
    assert _files(old_worktree) == before


def test_a_clone_without_the_branch_starts_it_from_base_ref(
    env: Env,
    cli: Callable[..., Result],
    repo: Path,
    git: Callable[..., str],
    hosts: tuple[Host, Host],
) -> None:
    a, b = hosts
    origin = env.root / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(repo), str(origin)], check=True)
    shutil.rmtree(repo)
    subprocess.run(["git", "clone", "-q", str(origin), str(repo)], check=True)
    first = _failed_on(cli, a, repo)["attempts"][0]
    old_worktree = Path(first["worktree"])
    before = _files(old_worktree)
    # Host b has a clone of its own at the same path: the task's branch was never pushed.
    host_a_clone = env.root / "host-a-clone"
    repo.rename(host_a_clone)
    subprocess.run(["git", "clone", "-q", str(origin), str(repo)], check=True)
    main_tip = git(repo, "rev-parse", "main").strip()

    moved = _on(cli, b, "redispatch", "1", "--json")

    assert moved.code == 0, moved.stderr
    attempt = moved.json()["attempt"]
    assert attempt["host"] == "host-b" and attempt["branch"] == "dispatch/1-job"
    worktree = Path(attempt["worktree"])
    assert worktree == b.worktree_root / "repo" / "task-1"
    shown = _settled(cli, b, 2)
    (branched,) = [e for e in shown["events"] if e["kind"] == "branched"]
    assert branched["detail"]["started_from"] == "main"
    assert "not in this host's repository" in branched["detail"]["reason"]
    # From base_ref: only this attempt's own commit on top of main.
    assert git(worktree, "log", "--format=%s", f"{main_tip}..HEAD").split() == ["work"]
    assert (worktree / "work.txt").read_text() == "work\n"
    assert _files(old_worktree) == before
    assert git(host_a_clone, "rev-parse", "--verify", "dispatch/1-job")


@pytest.mark.parametrize(
    "fault",
    [
        raises(RuntimeError("no space left on device")),  # an exception
        works_then_raises(tool_failed("git switch", "error: post-checkout hook failed")),  # exit
        returns(False),  # a false success
    ],
    ids=["exception", "exit", "false success"],
)
def test_a_failed_switch_is_undone_and_the_next_redispatch_goes_through(
    cli: Callable[..., Result],
    repo: Path,
    git: Callable[..., str],
    hosts: tuple[Host, Host],
    monkeypatch: pytest.MonkeyPatch,
    fault: Fault,
) -> None:
    a, b = hosts
    old_worktree = _moved(cli, a, b, repo)
    before = _files(old_worktree)

    _redispatch_failing(a, monkeypatch, "worktree", git={"switch": _once(fault)})

    assert git(old_worktree, "branch", "--show-current").strip() == "dispatch/1-job"
    assert _files(old_worktree) == before
    assert not git(repo, "branch", "--list", "dispatch/1-job-3").strip()
    shown = _show(cli, a)
    assert (shown["status"], shown["branch"]) == ("failed", "dispatch/1-job-2")
    assert shown["attempts"][-1]["outcome"] == "dispatch-failed"
    retried = _on(cli, a, "redispatch", "1", "--json")
    assert retried.code == 0, retried.stderr
    assert retried.json()["attempt"]["branch"] == "dispatch/1-job-4"
