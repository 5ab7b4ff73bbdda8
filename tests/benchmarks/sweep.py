"""`dispatch sweep` over 1,000 running attempts, beside one raw `tmux list-panes -a`; a
`tmux` shim counts the tmux calls each sweep makes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dispatch.adapters.tmux import PANE_FORMAT  # time the raw listing the sweep makes
from tests.benchmarks import seed
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
    dispatch_argv,
    measure,
    median_ms,
    migrate,
    ms,
)

SWEEP_ATTEMPTS = 1_000


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


def _pane(attempt_id: int) -> list[str]:
    """A pane that sleeps, started like the wrapper (`… agent-exec ID`), as the sweep expects."""
    return ["sh", "-c", "exec sleep 600", "agent-exec", str(attempt_id)]


def bench(lab: Lab, mode: Mode) -> list[Figure]:
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
    seed.running(world.url, repo=str(world.root / "repo"), socket=world.socket, windows=windows)

    shim_dir, log = _tmux_shim(world)
    path = f"{shim_dir}{os.pathsep}{world.env['PATH']}"
    env = dict(world.env, PATH=path, BENCH_TMUX_LOG=str(log))
    sweep = [*dispatch_argv(), "sweep", "--json"]
    raw = ["tmux", "-L", world.socket, "list-panes", "-a", "-F", PANE_FORMAT]
    ours: list[Sample] = []
    theirs: list[float] = []
    calls: list[list[str]] = []
    for i in range(mode.reps["sweep"] + 1):
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
