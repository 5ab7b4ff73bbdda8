"""ruff's checks and formatting over the code, on every run (the settings are in
pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv",
    [["check", "."], ["format", "--check", "src", "tests", "migrations"]],
    ids=["check", "format"],
)
def test_ruff_passes(argv: list[str], tmp_path: Path) -> None:
    program = Path(sys.executable).with_name("ruff")
    done = subprocess.run(
        [str(program), *argv, "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
