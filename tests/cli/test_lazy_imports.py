"""Commands import only what they use: the heavy libraries load on first need.

Speed itself is measured by the benchmark script; these tests check the cause of
slowness that a change most easily brings back: an import at module level.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Env, Result

HEAVY = {"sqlalchemy", "alembic", "libtmux", "git"}


def _imported(*args: str, cwd: Path) -> tuple[int, set[str]]:
    """The top-level packages `python -m dispatch ARGS` imports, from -X importtime."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dispatch", *args],
        capture_output=True, text=True, cwd=cwd, timeout=60,
    )  # fmt: skip
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            names.add(name.split(".")[0])
    assert "dispatch" in names  # the probe works: it sees dispatch itself
    return done.returncode, names


def test_version_and_help_import_no_heavy_library(env: Env) -> None:
    for args in (["--version"], ["--help"]):
        code, names = _imported(*args, cwd=env.root)
        assert code == 0
        assert not names & HEAVY, (args, sorted(names & HEAVY))


def test_list_and_show_import_neither_tmux_nor_git(
    env: Env, cli: Callable[..., Result], repo: Path
) -> None:
    assert cli("add", "x", cwd=repo).code == 0
    for args in (["list"], ["show", "1", "--json"]):
        code, names = _imported(*args, cwd=env.root)
        assert code == 0
        assert "sqlalchemy" in names  # it did read the database
        assert not names & {"libtmux", "git", "alembic"}, (args, sorted(names & HEAVY))


def test_add_imports_git_but_not_tmux(env: Env, repo: Path) -> None:
    code, names = _imported("add", "x", cwd=repo)
    assert code == 0
    assert "git" in names and "libtmux" not in names
