"""`dispatch run` to a confirmed spawn, on a 5,000-file and a one-file repository, beside
`git worktree add` + `tmux new-window` on the same repository; and its peak RSS."""

from __future__ import annotations

import json
import sqlite3
import statistics
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tests.benchmarks.harness import (
    SESSION,
    BenchError,
    Figure,
    Lab,
    Mode,
    Sample,
    World,
    checked,
    cpu_note,
    make_repo,
    measure,
    median_ms,
    migrate,
    ms,
    run,
    vm_hwm_kb,
    wait_for,
)

BIG_REPO_FILES = 5_000


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
        wrapper = vm_hwm_kb(row["wrapper_pid"])
        if wrapper is not None:
            stats.wrapper_rss_kb.append(wrapper)
    window = attempt["tmux_target"].rsplit(":", 1)[-1]
    world.tmux("kill-window", "-t", window)
    # The wrapper records the hang-up; let it finish before the next timed run.
    wait_for(lambda: _attempt_ended(world, attempt["id"]), 5)
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


def bench(lab: Lab, mode: Mode) -> list[Figure]:
    world = lab.world("run")
    migrate(world)
    small = make_repo(world.root / "one-file", world.env, 1)
    big = make_repo(world.root / "five-thousand", world.env, BIG_REPO_FILES)
    # A window that holds the session open, so both sides open a window in an existing
    # session, as in steady use.
    world.tmux("new-session", "-d", "-s", SESSION, "-n", "hold", "sleep", "3600")

    big_stats = _run_pairs(world, big, mode.reps["run_big"])
    small_stats = _run_pairs(world, small, mode.reps["run_small"])

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
