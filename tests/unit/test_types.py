"""Strict mypy over src/ and tests/ (the files pyproject.toml names), on every run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_strict_mypy_passes(tmp_path: Path) -> None:
    program = Path(sys.executable).with_name("mypy")
    done = subprocess.run(
        [str(program), "--cache-dir", str(tmp_path / "cache")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
