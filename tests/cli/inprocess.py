"""The CLI entry point run inside the test process: the same funnel and output, without
the half second a fresh interpreter spends importing; for tests that make many calls.

Tests of what only a real process shows (the console script, tracebacks, imports,
a terminal) use the `cli` fixture instead.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dispatch.cli.main import run
from tests.conftest import Env, Result


@dataclass
class InProcess:
    """`dispatch(*args)` with its exit code, stdout and stderr, like the `cli` fixture."""

    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch
    env: Env

    def __call__(
        self,
        *args: str,
        cwd: Path | None = None,
        input: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Result:
        self.capsys.readouterr()
        with self.monkeypatch.context() as patch:
            patch.chdir(cwd or self.env.root)
            for name, value in (extra_env or {}).items():
                patch.setenv(name, value)
            patch.setattr(sys, "stdin", io.StringIO(input or ""))
            code = run(list(args))
        captured = self.capsys.readouterr()
        return Result(code, captured.out, captured.err)
