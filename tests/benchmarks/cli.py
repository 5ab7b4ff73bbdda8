"""Measure dispatch's speed and memory against raw baselines, in one isolated run.

The command line of `tests/benchmarks/bench.py` (and `python -m tests.benchmarks`):
the parts in the order they run, and which of them to run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Callable

from tests.benchmarks import claim, listing, run, scale, serve, startup, sweep
from tests.benchmarks.harness import Figure, Lab, Mode, machine, report, section

Part = Callable[[Lab, Mode], list[Figure]]

PARTS: dict[str, Part] = {
    "startup": startup.bench,
    "list": listing.bench,
    "run": run.bench,
    "sweep": sweep.bench,
    "claim": claim.bench_sqlite,
    "claim-postgresql": claim.bench_postgresql,
    "serve": serve.bench,
    "scale": scale.bench,
}


def main(argv: list[str] | None = None) -> int:
    """The exit status: 0 when every target is met, 1 when one is missed or a measurement
    failed (argparse exits 2 on a usage error)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument(
        "--only", action="append", choices=tuple(PARTS), help="run only this part (repeatable)"
    )
    parser.add_argument("--tmpdir", help="where to make the temporary directory")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args(argv)
    mode = Mode.of(args.quick)
    wanted = args.only or list(PARTS)
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
        print(f"mode: {mode.name} {dict(mode.reps)}")
        for name, bench in PARTS.items():
            if name not in wanted:
                continue
            got: list[Figure] = []
            with section(name, got, failures):
                got.extend(bench(lab, mode))
            figures.extend(got)
    finally:
        lab.close()
    return report(figures, failures, args.markdown, started)
