"""Measure dispatch's speed and memory against raw baselines, in one isolated run.

Run by hand, never by pytest:

    python tests/benchmarks/bench.py            # full: ~6 minutes
    python tests/benchmarks/bench.py --quick    # fewer repetitions: ~3 minutes

Every figure is the median of repeated runs, printed beside its baseline measured
in the same run on the same machine. Exit status: 0 when every target is met, 1
when one is missed (or a measurement failed), 2 on a usage error. Everything
happens in a temporary directory with its own DISPATCH_HOME, DISPATCH_CONFIG,
HOME and private tmux server (`tmux -L`), all removed at the end. See
docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from dispatch.adapters.tmux import PANE_FORMAT  # time the raw listing the sweep makes

FULL = {
    "startup": 20,
    "list": 10,
    "run_big": 7,
    "run_small": 15,
    "sweep": 10,
    "claim": 3,
    "serve": 20,
    "scale": 5,
}
QUICK = {
    "startup": 5,
    "list": 3,
    "run_big": 3,
    "run_small": 5,
    "sweep": 3,
    "claim": 1,
    "serve": 7,
    "scale": 2,
}
# Seconds one claim run may last (each side): the rate is measured, not the time to drain.
CLAIM_CAP = {"full": 40.0, "quick": 20.0}
SECTIONS = ("startup", "list", "run", "sweep", "claim", "claim-postgresql", "serve", "scale")
SERVE_TASKS = 10_000
IDLE_SECONDS = 10.0

LIST_TASKS = 10_000
CLAIM_TASKS = 10_000
CLAIM_PROCESSES = 8
SWEEP_ATTEMPTS = 1_000
BIG_REPO_FILES = 5_000
HOST = "bench-host"
SESSION = "dispatch"

# A fresh process reading the rows `dispatch list --json` prints, with nothing but sqlite3.
RAW_LIST = """\
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.row_factory = sqlite3.Row
rows = con.execute(
    "SELECT id, title, status, repo, agent, base_ref, priority, closed_at, last_error,"
    " created_at, updated_at, branch, worktree FROM tasks WHERE closed_at IS NULL"
    " ORDER BY priority DESC, id"
).fetchall()
sys.stdout.write(json.dumps([dict(r) for r in rows]) + "\\n")
"""

RAW_CLAIM = (
    "UPDATE tasks SET status = 'in-progress', updated_at = ? WHERE id = ("
    "SELECT id FROM tasks WHERE status = 'ready' AND closed_at IS NULL "
    "ORDER BY priority DESC, id LIMIT 1) RETURNING id"
)
# The target's baseline: a raw claim making the rows dispatch's claim makes (the
# attempt, the task's pointer to it, the event). The bare UPDATE is a note beside it.
RAW_CLAIM_WRITES = (
    "INSERT INTO attempts (task_id, number, state, prior_status, host, resume, intent, "
    "started_at) VALUES (?, 1, 'starting', 'ready', 'bench', 0, '{}', ?) RETURNING id",
    "UPDATE tasks SET current_attempt_id = ? WHERE id = ?",
    "INSERT INTO events (task_id, attempt_id, kind, from_status, to_status, at, detail) "
    "VALUES (?, ?, 'claimed', 'ready', 'in-progress', ?, '{}')",
)


class BenchError(Exception):
    """A measurement could not be made (a command failed, a check did not hold)."""


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    cpu: float  # user + system seconds of the process and the children it waited for
    code: int
    max_rss_kb: int  # the process or any child it waited for (what /usr/bin/time reports)
    own_rss_kb: int | None  # the process alone (its VmHWM, sampled while it ran)
    stdout: str
    stderr: str


def _vm_hwm_kb(pid: int | None) -> int | None:
    """A live process's peak resident set (VmHWM), from /proc."""
    if not pid:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


def measure(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None, *, own_rss: bool = False
) -> Sample:
    """Run argv once: wall time, CPU time, exit code and peak RSS, from the kernel."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=dict(env), cwd=cwd
        )
        peak: list[int] = []
        done = threading.Event()

        def sample() -> None:
            # VmHWM only grows, so the last reading before exit is (nearly) the peak.
            while not done.wait(0.005):
                value = _vm_hwm_kb(proc.pid)
                if value is not None:
                    peak.append(value)

        sampler = threading.Thread(target=sample, daemon=True) if own_rss else None
        if sampler is not None:
            sampler.start()
        # wait4 rather than proc.wait(): it also returns the child's rusage, whose
        # ru_maxrss (KB on Linux) covers the process and the children it waited for.
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        done.set()
        if sampler is not None:
            sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Sample(
            seconds,
            usage.ru_utime + usage.ru_stime,
            proc.returncode,
            usage.ru_maxrss,
            max(peak) if peak else None,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def checked(sample: Sample, what: str) -> Sample:
    if sample.code != 0:
        raise BenchError(f"{what} exited {sample.code}: {sample.stderr.strip()[-500:]}")
    return sample


def run(argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> str:
    """Run a setup command (not timed); its stdout, or BenchError."""
    done = subprocess.run(
        list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])} … exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def cpu_note(samples: Sequence[Sample]) -> str:
    """CPU time says how much of the wall time was work, not waiting or a busy machine."""
    return f"cpu (user+sys) median {ms(median_ms([x.cpu for x in samples]))}"


# -- results -------------------------------------------------------------------------------


@dataclass
class Figure:
    name: str
    value: str
    baseline_name: str
    baseline: str
    ratio: str
    target: str
    ok: bool
    notes: list[str] = field(default_factory=list)


def _verdict(f: Figure) -> str:
    return "ok" if f.ok else "MISSED"


def ms(value: float) -> str:
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def print_table(figures: Sequence[Figure]) -> None:
    headers = ("figure", "dispatch", "compared with", "baseline", "ratio", "target", "")
    rows = [
        (f.name, f.value, f.baseline_name, f.baseline, f.ratio, f.target, _verdict(f))
        for f in figures
    ]
    widths = [max(len(str(r[i])) for r in (headers, *rows)) for i in range(len(headers))]
    line = "  ".join("-" * w for w in widths)
    print(line)
    for row in (headers, *rows):
        cells = [
            str(c).rjust(w) if i in (1, 3, 4) else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if row is headers:
            print(line)
    print(line)
    for f in figures:
        for note in f.notes:
            print(f"  {f.name}: {note}")


def markdown_table(figures: Sequence[Figure]) -> str:
    lines = [
        "| figure | dispatch | compared with | baseline | ratio | target | result |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for f in figures:
        result = "ok" if f.ok else "**missed**"
        lines.append(
            f"| {f.name} | {f.value} | {f.baseline_name} | {f.baseline} | {f.ratio} | "
            f"{f.target} | {result} |"
        )
    return "\n".join(lines)


# -- the isolated world --------------------------------------------------------------------


def dispatch_argv() -> list[str]:
    """The console script users run, found next to this interpreter; else `python -m`."""
    script = Path(sys.executable).parent / "dispatch"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "dispatch"]


def base_env(root: Path) -> dict[str, str]:
    """The caller's environment without anything that would reach the user's dispatch or tmux.

    PYTHONDONTWRITEBYTECODE goes too: an installed dispatch has its bytecode cached (pip
    compiles a wheel's modules as it installs them), and the warm-up runs write it.
    """
    dropped = ("DISPATCH_", "TMUX", "GIT_", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    home = root / "home"
    home.mkdir(exist_ok=True)
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_DATA_HOME=str(home / ".local" / "share"),
        GIT_CONFIG_GLOBAL=str(home / ".gitconfig"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CEILING_DIRECTORIES=str(root),
        GIT_AUTHOR_NAME="Dispatch Bench",
        GIT_AUTHOR_EMAIL="bench@dispatch.invalid",
        GIT_COMMITTER_NAME="Dispatch Bench",
        GIT_COMMITTER_EMAIL="bench@dispatch.invalid",
        DISPATCH_HOST=HOST,
    )
    return env


@dataclass
class World:
    """One dispatch installation: its home, config, database and tmux server."""

    name: str
    root: Path
    env: dict[str, str]
    socket: str

    @property
    def home(self) -> Path:
        return Path(self.env["DISPATCH_HOME"])

    @property
    def db_path(self) -> Path:
        return self.home / "dispatch.db"

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db_path}"

    def tmux(self, *args: str) -> str:
        return run(["tmux", "-L", self.socket, *args], self.env)

    def dispatch(self, *args: str, cwd: Path | None = None, own_rss: bool = False) -> Sample:
        return measure([*dispatch_argv(), *args], self.env, cwd or self.root, own_rss=own_rss)


class Lab:
    """The temporary directory every world lives in; tears down their tmux servers."""

    def __init__(self, parent: str | None, keep: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dispatch-bench-", dir=parent)).resolve()
        self.keep = keep
        self.env = base_env(self.root)
        self.sockets: list[str] = []
        self.tag = uuid.uuid4().hex[:8]

    def world(self, name: str) -> World:
        root = self.root / name
        root.mkdir()
        config = root / "config.toml"
        # Default timings (what users get); only the tmux session is spelled out.
        config.write_text(f'[tmux]\nsession = "{SESSION}"\n', encoding="utf-8")
        socket = f"dispatch-bench-{self.tag}-{name}"
        self.sockets.append(socket)
        env = dict(self.env)
        env.update(
            DISPATCH_HOME=str(root / "home"),
            DISPATCH_CONFIG=str(config),
            DISPATCH_TMUX_SOCKET=socket,
        )
        return World(name, root, env, socket)

    def close(self) -> None:
        for socket in self.sockets:
            subprocess.run(
                ["tmux", "-L", socket, "kill-server"],
                env=self.env,
                capture_output=True,
                check=False,
            )
            # TMUX_TMPDIR is not passed on, so every server's socket is in /tmp/tmux-UID.
            Path(f"/tmp/tmux-{os.getuid()}", socket).unlink(missing_ok=True)
        if self.keep:
            print(f"kept {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def make_repo(path: Path, env: Mapping[str, str], files: int) -> Path:
    """A repository on branch main with one commit of `files` small files."""
    run(["git", "init", "-q", "-b", "main", str(path)], env)
    run(["git", "-C", str(path), "config", "commit.gpgsign", "false"], env)
    if files == 1:
        (path / "README.md").write_text("hello\n", encoding="utf-8")
    else:
        per_dir = 100
        for i in range(files):
            folder = path / f"pkg{i // per_dir:03d}"
            if i % per_dir == 0:
                folder.mkdir()
            (folder / f"mod{i % per_dir:03d}.py").write_text(
                f'"""Module {i}."""\n\nVALUE = {i}\n', encoding="utf-8"
            )
    run(["git", "-C", str(path), "add", "-A"], env)
    run(["git", "-C", str(path), "commit", "-q", "-m", "initial"], env)
    return path


def migrate(world: World) -> None:
    """One real CLI call creates and migrates the database."""
    checked(world.dispatch("list", "--json"), "dispatch list (migration)")


def seed_tasks(world: World, count: int, *, repo: str, status: str = "ready") -> None:
    """Insert tasks through the store's models (not 10,000 CLI calls)."""
    from sqlalchemy import insert

    from dispatch.clock import utcnow
    from dispatch.store.database import Database
    from dispatch.store.models import Task

    now = utcnow()
    rows = [
        {
            "title": f"benchmark task {i}",
            "prompt": f"do thing {i}",
            "repo": repo,
            "agent": "shell",
            "base_ref": "main",
            "priority": i % 5,
            "status": status,
            "dispatch_failures": 0,
            "created_at": now,
            "updated_at": now,
        }
        for i in range(count)
    ]
    db = Database(world.url)
    try:
        db.write(lambda s: s.execute(insert(Task), rows))
    finally:
        db.dispose()


# -- figures -------------------------------------------------------------------------------


def bench_startup(lab: Lab, reps: int) -> list[Figure]:
    world = lab.world("startup")
    python = [sys.executable, "-c", "pass"]
    commands = {
        "python -c pass": python,
        "dispatch --version": [*dispatch_argv(), "--version"],
        "dispatch --help": [*dispatch_argv(), "--help"],
    }
    samples: dict[str, list[Sample]] = {name: [] for name in commands}
    for argv in commands.values():  # warm the page cache and .pyc files
        checked(measure(argv, world.env, world.root), argv[-1])
    for _ in range(reps):
        for name, argv in commands.items():
            samples[name].append(checked(measure(argv, world.env, world.root), name))
    base = median_ms([x.seconds for x in samples["python -c pass"]])
    figures = []
    for name in ("dispatch --version", "dispatch --help"):
        value = median_ms([x.seconds for x in samples[name]])
        figures.append(
            Figure(
                name.removeprefix("dispatch "),
                ms(value),
                "python -c pass",
                ms(base),
                f"{value / base:.1f}x",
                "<= 100 ms",
                value <= 100,
                [cpu_note(samples[name])],
            )
        )
    return figures


def bench_list(lab: Lab, reps: int) -> list[Figure]:
    world = lab.world("list")
    migrate(world)
    seed_tasks(world, LIST_TASKS, repo=str(world.root / "repo"))
    dispatch = [*dispatch_argv(), "list", "--json"]
    raw = [sys.executable, "-c", RAW_LIST, str(world.db_path)]
    first = checked(measure(dispatch, world.env, world.root), "dispatch list --json")
    listed = json.loads(first.stdout)
    if len(listed) != LIST_TASKS:
        raise BenchError(f"dispatch list --json printed {len(listed)} tasks, not {LIST_TASKS}")
    raw_rows = json.loads(checked(measure(raw, world.env, world.root), "raw list").stdout)
    if len(raw_rows) != LIST_TASKS:
        raise BenchError(f"the raw query returned {len(raw_rows)} rows, not {LIST_TASKS}")
    ours: list[Sample] = []
    theirs: list[float] = []
    for _ in range(reps):
        ours.append(checked(measure(dispatch, world.env, world.root), "dispatch list"))
        theirs.append(checked(measure(raw, world.env, world.root), "raw list").seconds)
    value, base = median_ms([x.seconds for x in ours]), median_ms(theirs)
    return [
        Figure(
            f"list --json, {LIST_TASKS:,} tasks",
            ms(value),
            "raw sqlite3 query, fresh python",
            ms(base),
            f"{value / base:.1f}x",
            "<= 400 ms",
            value <= 400,
            [cpu_note(ours)],
        )
    ]


@dataclass
class RunStats:
    ours: list[float] = field(default_factory=list)
    theirs: list[float] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    # From the claim (attempt started_at) to the wrapper's acknowledgement (heartbeat_at).
    claim_to_ack: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    own_rss_kb: list[int] = field(default_factory=list)
    git_rss_kb: list[int] = field(default_factory=list)
    wrapper_rss_kb: list[int] = field(default_factory=list)


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def _attempt_row(world: World, attempt_id: int) -> sqlite3.Row | None:
    """The attempt as stored, read without dispatch (and without taking a write lock)."""
    con = sqlite3.connect(f"file:{world.db_path}?mode=ro", uri=True, timeout=5)
    con.row_factory = sqlite3.Row
    try:
        row: sqlite3.Row | None = con.execute(
            "SELECT * FROM attempts WHERE id = ?", (attempt_id,)
        ).fetchone()
        return row
    finally:
        con.close()


def _attempt_ended(world: World, attempt_id: int) -> bool:
    row = _attempt_row(world, attempt_id)
    return row is not None and row["state"] == "ended"


def _one_dispatch_run(world: World, repo: Path, stats: RunStats | None) -> None:
    added = checked(
        world.dispatch(
            "add", "benchmark run", "--prompt", "sleep 30", "--agent", "shell", "--json", cwd=repo
        ),
        "dispatch add",
    )
    task_id = json.loads(added.stdout)["id"]
    sample = checked(
        world.dispatch("run", str(task_id), "--json", cwd=repo, own_rss=True), "dispatch run"
    )
    result = json.loads(sample.stdout)
    attempt = result["attempt"]
    row = _attempt_row(world, attempt["id"])
    if row is None or row["state"] != "running" or row["agent_pid"] is None:
        raise BenchError(f"dispatch run returned but attempt {attempt['id']} is not running")
    if stats is not None:
        stats.ours.append(sample.seconds)
        stats.samples.append(sample)
        if row["started_at"] and row["heartbeat_at"]:
            gap = datetime.fromisoformat(row["heartbeat_at"]) - datetime.fromisoformat(
                row["started_at"]
            )
            stats.claim_to_ack.append(gap.total_seconds())
        stats.rss_kb.append(sample.max_rss_kb)
        if sample.own_rss_kb is not None:
            stats.own_rss_kb.append(sample.own_rss_kb)
        wrapper = _vm_hwm_kb(row["wrapper_pid"])
        if wrapper is not None:
            stats.wrapper_rss_kb.append(wrapper)
    window = attempt["tmux_target"].rsplit(":", 1)[-1]
    world.tmux("kill-window", "-t", window)
    # The wrapper records the hang-up; let it finish before the next timed run.
    _wait_for(lambda: _attempt_ended(world, attempt["id"]), 5)
    run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", "--force", attempt["worktree"]],
        world.env,
    )
    run(["git", "-C", str(repo), "branch", "-D", attempt["branch"]], world.env)


def _one_raw_run(world: World, repo: Path, n: int, stats: RunStats | None) -> None:
    path = world.root / "raw-worktrees" / f"{repo.name}-{n}"
    branch = f"raw/{n}"
    add = ["git", "-C", str(repo), "worktree", "add", "--no-track", "-b", branch, str(path)]
    new_window = ["tmux", "-L", world.socket, "new-window", "-d", "-t", f"={SESSION}:"]
    new_window += ["-n", f"r{n}", "-c", str(path), "-P", "-F", "#{window_id}"]
    start = time.perf_counter()
    added = checked(measure([*add, "main"], world.env), "git worktree add")
    window = checked(
        measure([*new_window, "--", "sleep", "30"], world.env), "tmux new-window"
    ).stdout.strip()
    elapsed = time.perf_counter() - start
    if stats is not None:
        stats.theirs.append(elapsed)
        stats.git_rss_kb.append(added.max_rss_kb)
    world.tmux("kill-window", "-t", window)
    run(["git", "-C", str(repo), "worktree", "remove", "--force", "--force", str(path)], world.env)
    run(["git", "-C", str(repo), "branch", "-D", branch], world.env)


def _run_pairs(world: World, repo: Path, reps: int) -> RunStats:
    stats = RunStats()
    _one_raw_run(world, repo, 0, None)  # warm-up, discarded
    _one_dispatch_run(world, repo, None)
    for i in range(1, reps + 1):
        # Alternate the order so that neither side always inherits the other's page cache.
        if i % 2:
            _one_raw_run(world, repo, i, stats)
            _one_dispatch_run(world, repo, stats)
        else:
            _one_dispatch_run(world, repo, stats)
            _one_raw_run(world, repo, i, stats)
    return stats


def _run_notes(stats: RunStats) -> list[str]:
    notes = [cpu_note(stats.samples) + " (the dispatcher only; the wrapper runs in tmux)"]
    if stats.claim_to_ack:
        notes.append(f"claim -> wrapper acknowledgement median {ms(median_ms(stats.claim_to_ack))}")
    return notes


def bench_run(lab: Lab, reps_big: int, reps_small: int) -> list[Figure]:
    world = lab.world("run")
    migrate(world)
    small = make_repo(world.root / "one-file", world.env, 1)
    big = make_repo(world.root / "five-thousand", world.env, BIG_REPO_FILES)
    # A window that holds the session open, so both sides open a window in an existing
    # session, as in steady use.
    world.tmux("new-session", "-d", "-s", SESSION, "-n", "hold", "sleep", "3600")

    big_stats = _run_pairs(world, big, reps_big)
    small_stats = _run_pairs(world, small, reps_small)

    figures = []
    value, base = median_ms(big_stats.ours), median_ms(big_stats.theirs)
    figures.append(
        Figure(
            f"run to confirmed spawn, {BIG_REPO_FILES:,}-file repo",
            ms(value),
            "git worktree add + tmux new-window",
            ms(base),
            f"{value / base:.2f}x",
            "<= 1.3x",
            value / base <= 1.3,
            _run_notes(big_stats),
        )
    )
    value, base = median_ms(small_stats.ours), median_ms(small_stats.theirs)
    figures.append(
        Figure(
            "run to confirmed spawn, one-file repo",
            ms(value),
            "git worktree add + tmux new-window",
            ms(base),
            f"{value / base:.1f}x",
            "<= 5x, <= 700 ms",
            value / base <= 5 and value <= 700,
            _run_notes(small_stats),
        )
    )
    own = big_stats.own_rss_kb + small_stats.own_rss_kb
    tree = big_stats.rss_kb + small_stats.rss_kb
    git = big_stats.git_rss_kb + small_stats.git_rss_kb
    wrapper = big_stats.wrapper_rss_kb + small_stats.wrapper_rss_kb
    if not own:
        raise BenchError("could not read the peak RSS of any dispatch run")
    peak = max(own) / 1024
    rss = Figure(
        "peak RSS of dispatch run",
        f"{peak:.1f} MB",
        "—",
        "—",
        "—",
        "<= 80 MB",
        peak <= 80,
        [
            f"the dispatch process itself (VmHWM), max over {len(own)} runs "
            f"(median {statistics.median(own) / 1024:.1f} MB)",
            f"with the children it waited for, as /usr/bin/time reports: max "
            f"{max(tree) / 1024:.1f} MB; raw `git worktree add` alone: max "
            f"{max(git) / 1024:.1f} MB",
        ],
    )
    if wrapper:
        rss.notes.append(f"agent-exec wrapper peak RSS (VmHWM): max {max(wrapper) / 1024:.1f} MB")
    figures.append(rss)
    return figures


def _tmux_shim(world: World) -> tuple[Path, Path]:
    """A `tmux` first on PATH that logs each argv, then runs the real one."""
    real = shutil.which("tmux", path=world.env.get("PATH"))
    if real is None:
        raise BenchError("tmux is not on PATH")
    shim_dir = world.root / "shim"
    shim_dir.mkdir()
    log = world.root / "tmux-calls.log"
    shim = shim_dir / "tmux"
    shim.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$*" >> "$BENCH_TMUX_LOG"\nexec {real} "$@"\n',
        encoding="utf-8",
    )
    shim.chmod(0o755)
    return shim_dir, log


def _seed_running(world: World, windows: list[str]) -> None:
    """One in-progress task and one running attempt per live window, on this host."""
    from sqlalchemy import insert, update

    from dispatch.clock import utcnow
    from dispatch.store.database import Database
    from dispatch.store.models import Attempt, Task

    now = utcnow()
    ids = range(1, len(windows) + 1)
    tasks = [
        {
            "id": i,
            "title": f"running task {i}",
            "prompt": "sleep 600",
            "repo": str(world.root / "repo"),
            "agent": "shell",
            "base_ref": "main",
            "priority": 0,
            "status": "in-progress",
            "dispatch_failures": 0,
            "created_at": now,
            "updated_at": now,
        }
        for i in ids
    ]
    attempts = [
        {
            "id": i,
            "task_id": i,
            "number": 1,
            "state": "running",
            "prior_status": "ready",
            "host": HOST,
            "tmux_session": SESSION,
            "tmux_socket": world.socket,
            "tmux_target": f"{SESSION}:{window}",
            "intent": {},
            "resume": False,
            "started_at": now,
            "heartbeat_at": now,
        }
        for i, window in zip(ids, windows, strict=True)
    ]

    def work(s: Any) -> None:
        s.execute(insert(Task), tasks)
        s.execute(insert(Attempt), attempts)
        s.execute(update(Task).values(current_attempt_id=Task.id))

    db = Database(world.url)
    try:
        db.write(work)
    finally:
        db.dispose()


def _pane(attempt_id: int) -> list[str]:
    """A pane that sleeps, started like the wrapper (`… agent-exec ID`), as the sweep expects."""
    return ["sh", "-c", "exec sleep 600", "agent-exec", str(attempt_id)]


def bench_sweep(lab: Lab, reps: int) -> list[Figure]:
    world = lab.world("sweep")
    migrate(world)
    first = world.tmux(
        "new-session", "-d", "-s", SESSION, "-n", "w1", "-P", "-F", "#{window_id}", *_pane(1)
    )
    windows = [first.strip()]
    while len(windows) < SWEEP_ATTEMPTS:
        batch: list[str] = []
        for n in range(len(windows) + 1, min(len(windows) + 100, SWEEP_ATTEMPTS) + 1):
            batch += [";", "new-window", "-d", "-t", f"={SESSION}:", "-n", f"w{n}"]
            batch += ["-P", "-F", "#{window_id}", *_pane(n)]
        windows += world.tmux(*batch[1:]).split()
    if len(set(windows)) != SWEEP_ATTEMPTS:
        raise BenchError(f"made {len(set(windows))} tmux windows, not {SWEEP_ATTEMPTS}")
    _seed_running(world, windows)

    shim_dir, log = _tmux_shim(world)
    path = f"{shim_dir}{os.pathsep}{world.env['PATH']}"
    env = dict(world.env, PATH=path, BENCH_TMUX_LOG=str(log))
    sweep = [*dispatch_argv(), "sweep", "--json"]
    raw = ["tmux", "-L", world.socket, "list-panes", "-a", "-F", PANE_FORMAT]
    ours: list[Sample] = []
    theirs: list[float] = []
    calls: list[list[str]] = []
    for i in range(reps + 1):
        log.write_text("")
        sample = checked(measure(sweep, env, world.root), "dispatch sweep")
        report = json.loads(sample.stdout)
        if report["checked"] != SWEEP_ATTEMPTS or report["reaped"]:
            raise BenchError(
                f"sweep checked {report['checked']} and reaped {len(report['reaped'])}: "
                f"expected {SWEEP_ATTEMPTS} checked and none reaped (every pane is alive)"
            )
        listed = checked(measure(raw, world.env, world.root), "tmux list-panes")
        if len(listed.stdout.splitlines()) != SWEEP_ATTEMPTS:
            raise BenchError(f"tmux listed {len(listed.stdout.splitlines())} panes")
        if i == 0:
            continue  # warm-up
        ours.append(sample)
        theirs.append(listed.seconds)
        calls.append(log.read_text().splitlines())
    value, base = median_ms([x.seconds for x in ours]), median_ms(theirs)
    listings = [sum(1 for c in run_calls if "list-" in c) for run_calls in calls]
    total = [len(run_calls) for run_calls in calls]
    ok = value <= 500 and all(n == 1 for n in listings)
    return [
        Figure(
            f"sweep, {SWEEP_ATTEMPTS:,} running attempts",
            ms(value),
            "one raw tmux list-panes -a",
            ms(base),
            f"{value / base:.0f}x",
            "<= 500 ms, 1 listing",
            ok,
            [
                f"tmux listings per sweep: {sorted(set(listings))}; tmux calls per sweep: "
                f"{sorted(set(total))}",
                cpu_note(ours),
            ],
        )
    ]


# -- claim throughput --------------------------------------------------------------------


def _ready_left(db: str) -> bool:
    con = sqlite3.connect(db, timeout=30)
    try:
        return (
            con.execute("SELECT 1 FROM tasks WHERE status = 'ready' LIMIT 1").fetchone() is not None
        )
    finally:
        con.close()


def _claim_worker(kind: str, env: dict[str, str], cap: float, barrier: Any, results: Any) -> None:
    """One of the claiming processes; reports (claimed ids, lock errors, other errors).

    It stops when no task is left ready, or after `cap` seconds, so that a slow store
    cannot make the run endless; the rate is what counts.
    """
    claimed: list[int] = []
    locked = other = 0
    first_error = ""
    if kind == "dispatch":
        from dispatch.app import App
        from dispatch.config import load_settings
        from dispatch.errors import DispatchError
        from dispatch.services.dispatching import Dispatch, claim

        app = App(load_settings(env=env))
        app.db.ensure_schema()
        barrier.wait()
        deadline = time.monotonic() + cap
        while locked + other < 100 and time.monotonic() < deadline:
            d = Dispatch(app, None)
            try:
                if not claim(d):
                    break
            except Exception as exc:
                if not _ready_left(env["DISPATCH_DB"]):
                    break  # however this version says "nothing ready", it is not an error
                message = exc.message if isinstance(exc, DispatchError) else repr(exc)
                if "locked" in message or "busy" in message:
                    locked += 1
                else:
                    other += 1
                first_error = first_error or message
                continue
            assert d.task_id is not None
            claimed.append(d.task_id)
        app.close()
    else:
        con = sqlite3.connect(env["DISPATCH_DB"], isolation_level=None, timeout=5)
        # The same connection settings dispatch uses, so the ratio measures the store.
        con.execute("PRAGMA busy_timeout = 5000")
        con.execute("PRAGMA synchronous = NORMAL")
        barrier.wait()
        deadline = time.monotonic() + cap
        while locked + other < 100 and time.monotonic() < deadline:
            try:
                con.execute("BEGIN IMMEDIATE")
                now = time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime())
                row = con.execute(RAW_CLAIM, (now,)).fetchone()
                if row is not None and kind == "raw-writes":
                    attempt_sql, link_sql, event_sql = RAW_CLAIM_WRITES
                    [attempt] = con.execute(attempt_sql, (row[0], now)).fetchone()
                    con.execute(link_sql, (attempt, row[0]))
                    con.execute(event_sql, (row[0], attempt, now))
                con.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                if "locked" in str(exc) or "busy" in str(exc):
                    locked += 1
                else:
                    other += 1
                first_error = first_error or str(exc)
                continue
            if row is None:
                break
            claimed.append(row[0])
        con.close()
    results.put((claimed, locked, other, first_error))


@dataclass
class ClaimRun:
    rate: float
    claims: int
    doubles: int
    locked: int
    other: int
    first_error: str
    per_process: list[int]


def _claim_run(kind: str, env: dict[str, str], db: Path, cap: float) -> ClaimRun:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(CLAIM_PROCESSES + 1)
    results = ctx.Queue()
    env = dict(env, DISPATCH_DB=str(db))
    procs = [
        ctx.Process(target=_claim_worker, args=(kind, env, cap, barrier, results))
        for _ in range(CLAIM_PROCESSES)
    ]
    for p in procs:
        p.start()
    barrier.wait(timeout=120)
    start = time.perf_counter()
    reports = [results.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join(timeout=30)
    ids = [i for r in reports for i in r[0]]
    doubles = len(ids) - len(set(ids))
    con = sqlite3.connect(db)
    try:
        in_progress = con.execute(
            "SELECT COUNT(*) FROM tasks WHERE status = 'in-progress'"
        ).fetchone()[0]
        if kind == "dispatch":
            doubles += con.execute(
                "SELECT COUNT(*) FROM (SELECT task_id FROM attempts GROUP BY task_id "
                "HAVING COUNT(*) > 1)"
            ).fetchone()[0]
    finally:
        con.close()
    if in_progress != len(set(ids)):
        doubles += abs(in_progress - len(set(ids)))
    return ClaimRun(
        rate=len(ids) / elapsed,
        claims=len(ids),
        doubles=doubles,
        locked=sum(r[1] for r in reports),
        other=sum(r[2] for r in reports),
        first_error=next((r[3] for r in reports if r[3]), ""),
        per_process=sorted(len(r[0]) for r in reports),
    )


def bench_claim(lab: Lab, reps: int, cap: float) -> list[Figure]:
    world = lab.world("claim")
    (world.root / "repo").mkdir()  # a claim passes over tasks whose repository is missing
    migrate(world)
    seed_tasks(world, CLAIM_TASKS, repo=str(world.root / "repo"))
    con = sqlite3.connect(world.db_path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    ours: list[ClaimRun] = []
    theirs: list[ClaimRun] = []
    writes: list[ClaimRun] = []
    for i in range(reps):
        for kind, into in (("raw", theirs), ("raw-writes", writes), ("dispatch", ours)):
            copy = world.root / f"claim-{kind}-{i}.db"
            shutil.copyfile(world.db_path, copy)
            into.append(_claim_run(kind, world.env, copy, cap))
            copy.unlink()
    rate = statistics.median(r.rate for r in ours)
    bare = statistics.median(r.rate for r in theirs)
    base = statistics.median(r.rate for r in writes)
    doubles = sum(r.doubles for r in ours)
    locked = sum(r.locked for r in ours)
    other = sum(r.other for r in ours)
    notes = [
        f"dispatch: {doubles} double claims, {locked} lock errors, {other} other errors, "
        f"claims per run {[r.claims for r in ours]} (a run stops after {cap:g} s), "
        f"per process (last run) {ours[-1].per_process}",
        f"raw with the same writes: {sum(r.doubles for r in writes)} double claims, "
        f"{sum(r.locked for r in writes)} lock errors, per process (last run) "
        f"{writes[-1].per_process}; runs {[f'{r.rate:,.0f}/s' for r in writes]}",
        f"the bare raw claim (one UPDATE … RETURNING, no attempt or event): {bare:,.0f}/s "
        f"(dispatch {rate / bare:.0%} of it); dispatch runs {[f'{r.rate:,.0f}/s' for r in ours]}",
    ]
    first = next((r.first_error for r in ours if r.first_error), "")
    if first:
        notes.append(f"dispatch's first error: {first}")
    return [
        Figure(
            f"claims/s, {CLAIM_PROCESSES} processes, {CLAIM_TASKS:,} tasks",
            f"{rate:,.0f}/s",
            "raw claim making the same rows (attempt, link, event)",
            f"{base:,.0f}/s",
            f"{rate / base:.0%}",
            ">= 50 %, 0 double, 0 locked",
            rate >= 0.5 * base and doubles == 0 and locked == 0 and other == 0,
            notes,
        )
    ]


def bench_claim_postgresql(lab: Lab, reps: int, cap: float) -> list[Figure]:
    """The same claims on a private PostgreSQL server: tests/benchmarks/fleet.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.benchmarks import fleet

    try:
        return fleet.bench_claim_postgresql(lab, reps, cap, Figure)
    except fleet.Unavailable as exc:
        raise BenchError(str(exc)) from None


# -- a year of history (tests/benchmarks/scale.py) -----------------------------------------


def bench_scale(lab: Lab, reps: int) -> list[Figure]:
    try:
        from tests.benchmarks import scale
    except ImportError:  # run as a script: this directory is on the path
        import scale  # type: ignore[import-not-found, no-redef]
    return scale.bench_scale(lab, reps, sys.modules[__name__])


# -- the run -------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return "missing"


def _filesystem(path: Path) -> str:
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- the monitor ---------------------------------------------------------------------------


# What RAW_LIST reads: the rows of `GET /api/tasks` without their attempts.
LIST_QUERY = (
    "SELECT id, title, status, repo, agent, base_ref, priority, closed_at, last_error,"
    " created_at, updated_at, branch, worktree FROM tasks WHERE closed_at IS NULL"
    " ORDER BY priority DESC, id"
)


def _seed_attempts(world: World) -> None:
    """One ended attempt for every task: the monitor lists each task with its latest."""
    con = sqlite3.connect(world.db_path)
    try:
        with con:
            con.execute(
                "INSERT INTO attempts (task_id, number, state, outcome, exit_code, prior_status,"
                " host, resume, intent, started_at, ended_at) SELECT id, 1, 'ended', 'failed',"
                " 1, 'ready', 'bench', 0, '{}', created_at, created_at FROM tasks"
            )
    finally:
        con.close()


def _start_server(world: World) -> tuple[subprocess.Popen[str], int, str]:
    proc = subprocess.Popen(
        [*dispatch_argv(), "serve", "--port", "0", "--sweep-every", "0"],
        env=world.env, cwd=world.root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if "#token=" not in line:
        proc.kill()
        raise BenchError(f"dispatch serve printed {line!r}")
    address, token = line.split("/#token=")
    return proc, int(address.rsplit(":", 1)[1]), token


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench_serve(lab: Lab, reps: int) -> list[Figure]:
    import http.client

    world = lab.world("serve")
    repo = make_repo(world.root / "repo", world.env, 1)
    migrate(world)
    seed_tasks(world, SERVE_TASKS, repo=str(repo))
    _seed_attempts(world)
    proc, port, token = _start_server(world)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def get_tasks() -> float:
            start = time.perf_counter()
            conn.request("GET", "/api/tasks", headers=auth)
            response = conn.getresponse()
            body = response.read()
            took = time.perf_counter() - start
            if response.status != 200 or len(json.loads(body)) != SERVE_TASKS:
                raise BenchError(f"GET /api/tasks answered {response.status}")
            return took

        get_tasks()  # warm: imports, page cache
        listed = [get_tasks() for _ in range(reps)]
        raw: list[float] = []
        for _ in range(reps):
            start = time.perf_counter()
            con = sqlite3.connect(world.db_path)
            con.row_factory = sqlite3.Row
            json.dumps([dict(r) for r in con.execute(LIST_QUERY)])
            con.close()
            raw.append(time.perf_counter() - start)

        # One page open: its stream, then CLI changes and when their frames arrive.
        stream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        stream.request("GET", "/api/events", headers=auth)
        feed = stream.getresponse()
        feed.readline()  # ": connected"
        feed.readline()
        latencies: list[float] = []
        for i in range(reps):
            checked(world.dispatch("add", f"live {i}", "--repo", str(repo)), "add")
            while True:
                line = feed.readline().decode()
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    at = datetime.fromisoformat(event["at"].replace("Z", "+00:00"))
                    latencies.append((datetime.now(at.tzinfo) - at).total_seconds())
                    break

        before = _cpu_seconds(proc.pid)
        time.sleep(IDLE_SECONDS)
        idle = (_cpu_seconds(proc.pid) - before) / IDLE_SECONDS * 100
        stream.close()
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    if proc.returncode != 0:
        raise BenchError(f"dispatch serve exited {proc.returncode} on SIGTERM")
    value, base = median_ms(listed), median_ms(raw)
    latency = median_ms(latencies)
    return [
        Figure(
            f"GET /api/tasks, {SERVE_TASKS:,} tasks",
            ms(value),
            "raw sqlite3 query + json, in process",
            ms(base),
            f"{value / base:.1f}x",
            "<= 150 ms",
            value <= 150,
        ),
        Figure(
            "CLI change -> SSE frame",
            ms(latency),
            "the watcher's poll interval",
            ms(500),
            f"{latency / 500:.1f}x",
            "<= 1 s",
            latency <= 1000,
            [f"max {ms(max(latencies) * 1000)}"],
        ),
        Figure(
            f"idle CPU, one stream, {IDLE_SECONDS:.0f} s",
            f"{idle:.2f} %",
            "-",
            "-",
            "-",
            "<= 1 %",
            idle <= 1.0,
        ),
    ]


def machine(lab: Lab) -> dict[str, str]:
    import sqlalchemy

    memory = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "git": _version(["git", "--version"]).removeprefix("git version "),
        "tmux": _version(["tmux", "-V"]).removeprefix("tmux "),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "temp dir": f"{lab.root.parent} ({_filesystem(lab.root)})",
        "load average": _load(),
        "dispatch": " ".join(dispatch_argv()),
    }


@contextlib.contextmanager
def section(name: str, figures: list[Figure], failures: list[str]) -> Iterator[None]:
    print(f"… {name}", flush=True)
    start = time.perf_counter()
    try:
        yield
    except BenchError as exc:
        failures.append(f"{name}: {exc}")
        print(f"  failed: {exc}", flush=True)
    else:
        for f in figures:
            print(f"  {f.name}: {f.value} vs {f.baseline} ({'ok' if f.ok else 'MISSED'})")
    print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this part (repeatable)"
    )
    parser.add_argument("--tmpdir", help="where to make the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args(argv)
    reps = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    wanted = args.only or list(SECTIONS)
    if shutil.which("tmux") is None or shutil.which("git") is None:
        print("bench: tmux and git are needed", file=sys.stderr)
        return 1

    lab = Lab(args.tmpdir, args.keep)
    figures: list[Figure] = []
    failures: list[str] = []
    started = time.perf_counter()
    try:
        info = machine(lab)
        print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
        print(f"mode: {mode} {reps}")
        plan: list[tuple[str, Callable[[], list[Figure]]]] = [
            ("startup", lambda: bench_startup(lab, reps["startup"])),
            ("list", lambda: bench_list(lab, reps["list"])),
            ("run", lambda: bench_run(lab, reps["run_big"], reps["run_small"])),
            ("sweep", lambda: bench_sweep(lab, reps["sweep"])),
            ("claim", lambda: bench_claim(lab, reps["claim"], CLAIM_CAP[mode])),
            (
                "claim-postgresql",
                lambda: bench_claim_postgresql(lab, reps["claim"], CLAIM_CAP[mode]),
            ),
            ("serve", lambda: bench_serve(lab, reps["serve"])),
            ("scale", lambda: bench_scale(lab, reps["scale"])),
        ]
        for name, bench in plan:
            if name not in wanted:
                continue
            got: list[Figure] = []
            with section(name, got, failures):
                got.extend(bench())
            figures.extend(got)
    finally:
        lab.close()
    print()
    print_table(figures)
    if args.markdown:
        print()
        print(markdown_table(figures))
    missed = [f.name for f in figures if not f.ok]
    print()
    print(f"total {time.perf_counter() - started:.0f} s; load average at the end {_load()}")
    if os.getloadavg()[0] > 0.5 * len(os.sched_getaffinity(0)):
        print("note: other work was running on this machine; wall times are inflated")
    for failure in failures:
        print(f"FAILED {failure}")
    if missed:
        print("MISSED " + "; ".join(missed))
    if missed or failures:
        return 1
    print("every target met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
