"""`python -m dispatch`: the same entry point as the console script."""

from __future__ import annotations

from dispatch.cli.console import main

main()
