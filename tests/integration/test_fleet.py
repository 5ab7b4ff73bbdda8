"""A fleet end to end (SPEC §10): three hosts on this machine, one PostgreSQL database.

Each "host" is its own `DISPATCH_HOST`, `DISPATCH_HOME`, config, `worktree_root` and
tmux server (`-L`); they share the database and, since they share a disk, the
repository. Every command is the real `dispatch` program, as docs/fleet.md runs it.
A host is frozen with the cgroup freezer: tmux undoes a SIGSTOP of a pane's process,
and a frozen host is what a hung machine looks like to the others.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest

from dispatch.store.revisions import HEAD_REVISION
from tests.conftest import BASE_CONFIG, TMUX, Env, Result
from tests.faults import agent_profile, wait_for

FREEZER = Path("/sys/fs/cgroup/freezer")
STALE_SECONDS = 4

QUICK = agent_profile("quick", ["sh", "-c", "sleep 1; echo {task_id} > out.txt"])


def _napper(seconds: int) -> str:
    script = f"sleep {seconds}; echo {{attempt_id}} >> naps.txt"
    return agent_profile("napper", ["sh", "-c", script])


# On alpha it outlives the freeze: its late exit 0 is what fencing must ignore. On beta
# it runs well past that late report, so the report meets beta's attempt running.
NAPPER = {"alpha": _napper(6), "beta": _napper(12), "gamma": _napper(12)}
SPECIAL = agent_profile("special", ["sh", "-c", "echo special > out.txt"])


@dataclass
class Host:
    name: str
    home: Path
    config: Path
    socket: str
    worktree_root: Path
    database: str

    @property
    def environ(self) -> dict[str, str]:
        return {
            "DISPATCH_HOST": self.name,
            "DISPATCH_HOME": str(self.home),
            "DISPATCH_CONFIG": str(self.config),
            "DISPATCH_TMUX_SOCKET": self.socket,
            "DISPATCH_DB": self.database,
        }

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True)


class Fleet:
    def __init__(self, env: Env, cli: Callable[..., Result], database: str) -> None:
        self.cli = cli
        self.hosts: dict[str, Host] = {}
        for name, profiles in {
            "alpha": QUICK + NAPPER["alpha"] + SPECIAL,
            "beta": QUICK + NAPPER["beta"] + SPECIAL,
            "gamma": QUICK + NAPPER["gamma"],  # knows no `special` agent
        }.items():
            config = env.root / f"{name}.toml"
            root = env.root / f"{name}-worktrees"
            text = BASE_CONFIG + f'worktree_root = "{root}"\nstale_after = "{STALE_SECONDS}s"\n'
            config.write_text(text + profiles, encoding="utf-8")
            socket = f"dispatch-fleet-{uuid4().hex[:8]}-{name}"
            self.hosts[name] = Host(name, env.root / f"{name}-home", config, socket, root, database)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def on(self, host: str, *args: str, cwd: Path | None = None) -> Result:
        return self.cli(*args, cwd=cwd, extra_env=self.hosts[host].environ)

    def at_once(self, *calls: tuple[str, tuple[str, ...]]) -> list[Result]:
        with ThreadPoolExecutor(max_workers=len(calls)) as pool:
            return list(pool.map(lambda call: self.on(call[0], *call[1]), calls))

    def json(self, host: str, *args: str) -> Any:
        done = self.on(host, *args, "--json")
        assert done.code == 0, (args, done.stdout, done.stderr)
        return done.json()

    def show(self, task_id: int, host: str = "beta") -> dict[str, Any]:
        data: dict[str, Any] = self.json(host, "show", str(task_id))
        return data

    def wait_done(self, task_id: int) -> None:
        wait_for(lambda: self.show(task_id)["status"] == "done", f"task {task_id} done")

    def kill_servers(self) -> None:
        for host in self.hosts.values():
            host.tmux("kill-server")
            # A server that died without its own cleanup (SIGKILL) leaves its socket file.
            tmpdir = Path(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}")
            (tmpdir / host.socket).unlink(missing_ok=True)


class Freezer:
    """One cgroup v1 freezer group; thawed and removed whatever happens."""

    def __init__(self) -> None:
        self.path = FREEZER / f"dispatch-test-{uuid4().hex[:8]}"
        self.origins: dict[int, Path] = {}

    def freeze(self, pids: list[int]) -> None:
        self.path.mkdir()
        for pid in pids:
            with contextlib.suppress(OSError):
                self.origins[pid] = _freezer_group(pid)
                (self.path / "cgroup.procs").write_text(f"{pid}\n")
        (self.path / "freezer.state").write_text("FROZEN\n")
        wait_for(lambda: self.state() == "FROZEN", "the freezer to freeze")

    def state(self) -> str:
        return (self.path / "freezer.state").read_text().strip()

    def thaw(self) -> None:
        if not self.path.exists():
            return
        (self.path / "freezer.state").write_text("THAWED\n")
        wait_for(lambda: self.state() == "THAWED", "the freezer to thaw")
        for pid, origin in self.origins.items():
            with contextlib.suppress(OSError):
                (origin / "cgroup.procs").write_text(f"{pid}\n")
        with contextlib.suppress(OSError):
            self.path.rmdir()


def _freezer_group(pid: int) -> Path:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, where = line.split(":", 2)
        if "freezer" in controllers.split(","):
            return FREEZER / where.lstrip("/")
    return FREEZER


def _descendants(root: int) -> list[int]:
    """root and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _freezer_usable() -> str | None:
    if not (FREEZER / "cgroup.procs").exists():
        return f"no cgroup v1 freezer at {FREEZER}"
    probe = FREEZER / f"dispatch-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        return f"cannot make a freezer group under {FREEZER}: {exc.strerror}"
    return None


@pytest.fixture
def fleet(pg: str, env: Env, cli: Callable[..., Result]) -> Iterator[Fleet]:
    made = Fleet(env, cli, pg)
    try:
        yield made
    finally:
        made.kill_servers()


def _by_kind(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == kind]


def test_three_hosts_share_one_queue_and_recover_a_frozen_one(
    fleet: Fleet, repo: Path, env: Env, git: Callable[..., str]
) -> None:
    reason = _freezer_usable()
    if reason is not None:
        pytest.skip(reason)

    # First use from the three at once: migrated once (PostgreSQL advisory lock).
    first = fleet.at_once(*((h, ("list", "--json")) for h in ("alpha", "beta", "gamma")))
    assert [(r.code, r.json()) for r in first] == [(0, [])] * 3, [r.stderr for r in first]
    for host in ("alpha", "beta", "gamma"):
        current = fleet.on(host, "db", "current")
        assert current.code == 0 and HEAD_REVISION in current.stdout

    # Nine tasks, three hosts claiming at once: each task exactly once, each host three.
    for n in range(9):
        added = fleet.on("alpha", "add", f"job {n}", "--agent", "quick", "--prompt", "p", cwd=repo)
        assert added.code == 0, added.stderr
    runs = fleet.at_once(*((h, ("run", "--next", "--max", "3", "--json")) for h in fleet.hosts))
    claimed: dict[str, list[int]] = {}
    for host, ran in zip(fleet.hosts, runs, strict=True):
        assert ran.code == 0, (host, ran.stdout, ran.stderr)
        claimed[host] = [item["task"]["id"] for item in ran.json()]
    assert sorted(t for ids in claimed.values() for t in ids) == list(range(1, 10))
    assert all(claimed.values()), claimed  # every host got work
    for task_id in range(1, 10):
        fleet.wait_done(task_id)
    for host, task_ids in claimed.items():
        for task_id in task_ids:
            shown = fleet.show(task_id, host)
            (attempt,) = shown["attempts"]
            assert attempt["host"] == host and attempt["outcome"] == "success"
            assert Path(attempt["worktree"]).parent.parent == fleet[host].worktree_root
            assert (Path(attempt["worktree"]) / "out.txt").read_text() == f"{task_id}\n"
            assert len(_by_kind(shown["events"], "claimed")) == 1
    listed = fleet.json("gamma", "list")
    assert {t["id"]: t["host"] for t in listed} == {t: h for h, ids in claimed.items() for t in ids}

    # Alpha starts two long tasks, then hangs.
    for n in (10, 11):
        added = fleet.on("alpha", "add", f"nap {n}", "--agent", "napper", "--prompt", "p", cwd=repo)
        assert added.code == 0, added.stderr
    started = fleet.json("alpha", "run", "--next", "--max", "2")
    assert [item["task"]["id"] for item in started] == [10, 11]
    alpha_attempts = {item["task"]["id"]: item["attempt"] for item in started}
    server_pid = int(fleet["alpha"].tmux("display-message", "-p", "#{pid}").stdout)
    freezer = Freezer()
    try:
        freezer.freeze(_descendants(server_pid))

        early = fleet.json("beta", "sweep")
        assert early["reaped"] == []  # heartbeats are fresh: not yet
        assert [fleet.show(t)["status"] for t in (10, 11)] == ["in-progress"] * 2
        time.sleep(STALE_SECONDS + 1.5)  # past stale_after, with no heartbeat since

        sweeps = fleet.at_once(("beta", ("sweep", "--json")), ("gamma", ("sweep", "--json")))
        assert [s.code for s in sweeps] == [0, 0], [s.stderr for s in sweeps]
        reaped = sorted(r["task_id"] for s in sweeps for r in s.json()["reaped"])
        assert reaped == [10, 11]  # between the two sweeps, each once
        for task_id in (10, 11):
            shown = fleet.show(task_id)
            assert shown["status"] == "interrupted"
            assert len(_by_kind(shown["events"], "reaped")) == 1

        moved = fleet.json("beta", "redispatch", "--status", "interrupted")
        assert sorted(item["task_id"] for item in moved) == [10, 11]
        beta_attempts = {item["task_id"]: item["attempt"] for item in moved}
        for task_id, attempt in beta_attempts.items():
            assert item_error(moved, task_id) is None
            assert attempt["host"] == "beta"
            assert Path(attempt["worktree"]).parent.parent == fleet["beta"].worktree_root
            # The branch stays checked out in alpha's worktree of the shared repository.
            assert attempt["branch"] == f"{alpha_attempts[task_id]['branch']}-2"
        before = {t: fleet.show(t) for t in (10, 11)}
    finally:
        freezer.thaw()

    # Alpha wakes: its wrappers' agents end and report, and nothing of beta's changes.
    def late_reports() -> bool:
        return all(fleet.show(t)["attempts"][0]["exit_code"] is not None for t in alpha_attempts)

    wait_for(late_reports, "alpha's wrappers to record their agents' exits")
    for task_id in (10, 11):
        shown, earlier = fleet.show(task_id), before[task_id]
        old, new = shown["attempts"]
        assert (old["host"], old["outcome"], old["exit_code"]) == ("alpha", "interrupted", 0)
        # Beta's attempt runs on (its agent naps longer than alpha's late report took).
        assert (shown["status"], new["state"]) == ("in-progress", "running")
        assert {**new, "heartbeat_at": None} == {**earlier["attempts"][1], "heartbeat_at": None}
        for column in ("branch", "worktree", "last_error", "updated_at"):
            assert shown[column] == earlier[column], column
        late = shown["events"][len(earlier["events"]) :]
        assert all(e["attempt_id"] == old["id"] and e["to_status"] is None for e in late), late
    for task_id in (10, 11):
        fleet.wait_done(task_id)
        shown = fleet.show(task_id)
        assert shown["attempts"][1]["host"] == "beta"
        assert shown["attempts"][1]["outcome"] == "success"
        worktree = Path(shown["attempts"][1]["worktree"])
        assert (worktree / "naps.txt").read_text() == f"{shown['attempts'][1]['id']}\n"

    # Gamma lacks the `special` profile and a repository that only alpha has: it skips
    # both, runs the task behind them, and fails neither.
    elsewhere = env.root / "elsewhere"
    shutil.copytree(repo, elsewhere)
    add = ("add", "--prompt", "p", "--priority", "5")
    assert fleet.on("alpha", *add, "special one", "--agent", "special", cwd=repo).code == 0
    assert fleet.on("alpha", *add, "elsewhere", "--agent", "quick", cwd=elsewhere).code == 0
    plain = fleet.on("alpha", "add", "plain", "--agent", "quick", "--prompt", "p", cwd=repo)
    assert plain.code == 0
    hidden = env.root / "elsewhere-on-alpha-only"
    elsewhere.rename(hidden)
    ran = fleet.json("gamma", "run", "--next", "--max", "3")
    assert [item["task"]["title"] for item in ran] == ["plain"]
    special, far = fleet.show(12, "gamma"), fleet.show(13, "gamma")
    assert (special["status"], special["attempts"]) == ("ready", [])
    assert (far["status"], far["attempts"]) == ("ready", [])
    hidden.rename(elsewhere)
    ran = fleet.json("alpha", "run", "--next", "--max", "2")
    assert sorted(item["task"]["id"] for item in ran) == [12, 13]
    for task_id in (12, 13, 14):
        fleet.wait_done(task_id)
    assert git(repo, "worktree", "list")  # the shared repository is still sound


def item_error(items: list[dict[str, Any]], task_id: int) -> Any:
    return next(item["error"] for item in items if item["task_id"] == task_id)
