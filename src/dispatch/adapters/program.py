"""Running one external program: what the git and tmux chokepoints share."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping

from dispatch.errors import EnvironmentProblem, ToolFailed


def run_program(
    argv: list[str], *, timeout: float, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run argv (never through a shell) with no input, its output captured as text.

    A binary that has vanished is an environment problem; one that does not answer in
    time is a failed tool (a wedged server or a hook that hangs: failing beats hanging).
    """
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            env=None if env is None else dict(env),
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        name = argv[0].rsplit("/", 1)[-1]
        raise EnvironmentProblem(f"{name} cannot be run: {argv[0]} is gone") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolFailed(argv, -1, f"no answer within {timeout:g} s") from exc
