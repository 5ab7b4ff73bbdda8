"""dispatch: run coding agents on tasks in their own git worktrees and tmux windows."""

from __future__ import annotations

__version__ = "0.1.0"
