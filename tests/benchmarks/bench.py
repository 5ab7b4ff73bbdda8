"""Measure dispatch's speed and memory against raw baselines, in one isolated run.

Run by hand, never by pytest:

    python tests/benchmarks/bench.py            # full: ~6 minutes
    python tests/benchmarks/bench.py --quick    # fewer repetitions: ~3 minutes

The same as `python -m tests.benchmarks` from the repository's root. Every figure is
the median of repeated runs, printed beside its baseline measured in the same run on
the same machine. Exit status: 0 when every target is met, 1 when one is missed (or
a measurement failed), 2 on a usage error. Everything happens in a temporary
directory with its own DISPATCH_HOME, DISPATCH_CONFIG, HOME and private tmux server
(`tmux -L`), all removed at the end. The parts are the modules beside this one
(`cli` lists them); see docs/performance.md.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    from tests.benchmarks.cli import main as run_parts

    return run_parts()


if __name__ == "__main__":
    # Run as a script, this folder would be first on the path and its modules importable
    # under bare names too (a second copy of each); the repository's root instead, so
    # they are the package's, here and in the claim parts' spawned processes.
    sys.path[0] = str(Path(__file__).resolve().parents[2])
    sys.exit(main())
