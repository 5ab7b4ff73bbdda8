"""Names dispatch gives what it makes: branches, worktree paths, windows, files."""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

from dispatch.app import App

# The wrapper's subcommand: its argv ends `agent-exec <attempt id>`, which is how a
# window is recognised as an attempt's even when its recorded id is stale.
WRAPPER_MARKER = "agent-exec"


def slugify(title: str, limit: int = 40) -> str:
    """Lowercase ASCII `[a-z0-9-]`, at most `limit` characters; never empty."""
    ascii_text = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:limit].rstrip("-") or "task"


def branch_name(task_id: int, title: str) -> str:
    return f"dispatch/{task_id}-{slugify(title)}"


def worktree_path(root: Path, repo: str, task_id: int) -> Path:
    """Where a task's worktree goes; `root` is the resolved `worktree_root`."""
    return root / Path(repo).name / f"task-{task_id}"


def window_name(task_id: int) -> str:
    return f"t{task_id}"


def wrapper_argv(attempt_id: int) -> list[str]:
    """The wrapper, by absolute interpreter path: a running tmux server has its own PATH.

    `-P`: `python -m` would put its working directory, the task's worktree, first on
    the module path, and a repository's own `dispatch/`, `tomllib.py` or `json/` would
    be imported in place of ours."""
    return [sys.executable, "-P", "-m", "dispatch", WRAPPER_MARKER, str(attempt_id)]


def wrapper_marker(attempt_id: int) -> str:
    return f"{WRAPPER_MARKER} {attempt_id}"


def prompt_path(app: App, attempt_id: int) -> Path:
    return app.settings.attempts_dir / str(attempt_id) / "prompt.md"
