"""docs/cli.md is generated from `--help`; this test fails when it goes stale.

Regenerate with: python -m tests.cli.test_cli_reference
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
COMMANDS = [
    [],
    ["add"],
    ["list"],
    ["show"],
    ["run"],
    ["redispatch"],
    ["cancel"],
    ["done"],
    ["reset"],
    ["close"],
    ["reopen"],
    ["sweep"],
    ["attach"],
    ["logs"],
    ["events"],
    ["doctor"],
    ["db", "upgrade"],
    ["db", "current"],
]

HEADER = """\
# CLI reference

Generated from `dispatch … --help` by `python -m tests.cli.test_cli_reference`;
a test fails when this page and the program disagree.

Exit codes (every command): 0 done as asked (also: nothing to do), 1 unexpected
internal error, 2 usage error, 3 conflict (the task's status does not allow it),
4 not found, 5 the task is closed, 6 dispatch failed and was rolled back,
7 environment (tmux or git missing, not a repository, database unusable, config
invalid). With `--json`, errors are printed on stdout as
`{"error": {"code": …, "kind": …, "message": …}}`.
"""


def _help(args: list[str]) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_")}
    environ.update(COLUMNS="100", NO_COLOR="1", TERM="dumb")
    done = subprocess.run(
        [sys.executable, "-m", "dispatch", *args, "--help"],
        capture_output=True,
        text=True,
        env=environ,
        check=True,
    )
    return "\n".join(line.rstrip() for line in done.stdout.strip().splitlines())


def render() -> str:
    parts = [HEADER]
    for args in COMMANDS:
        title = " ".join(["dispatch", *args])
        parts.append(f"## `{title}`\n\n```text\n{_help(args)}\n```\n")
    return "\n".join(parts)


def test_cli_reference_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render(), (
        "docs/cli.md is stale: run python -m tests.cli.test_cli_reference"
    )


if __name__ == "__main__":
    DOC.write_text(render(), encoding="utf-8")
