"""`python -m tests.benchmarks`: the same as `python tests/benchmarks/bench.py`."""

from __future__ import annotations

import sys

from tests.benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
