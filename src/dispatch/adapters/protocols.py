"""The seams between services and external programs; tests inject faults here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class Pane:
    """One row of the raw `tmux list-panes -a` listing."""

    session: str
    window_id: str
    window_name: str
    pane_id: str
    pane_pid: int
    dead: bool
    dead_status: int | None
    start_command: str


class Terminal(Protocol):
    """tmux on one server (socket)."""

    def require(self) -> None:
        """EnvironmentProblem when tmux cannot be run here; nothing is run to find out."""
        ...

    def health(self, session: str) -> str:
        """tmux's version and whether its server answers; EnvironmentProblem if not."""
        ...

    def spawn(
        self, session: str, name: str, argv: list[str], cwd: Path, env: Mapping[str, str]
    ) -> str:
        """Open a detached window running argv (no shell); return its window id ("@N")."""
        ...

    def window_exists(self, window_id: str) -> bool: ...

    def kill_window(self, window_id: str) -> None:
        """Kill a window; a window already gone is not an error."""
        ...

    def list_panes(self) -> list[Pane]:
        """Every pane of the server in one call; [] when no server runs."""
        ...

    def send_interrupt(self, window_id: str) -> None:
        """Send C-c to the window's pane."""
        ...

    def pipe_pane(self, pane_id: str, log_path: Path) -> None:
        """Append everything the pane prints to log_path."""
        ...

    def attach_argv(self, window_id: str, inside_tmux: bool) -> list[str]:
        """The argv that attaches to (or, inside tmux, switches to) the window."""
        ...


class Worktrees(Protocol):
    """git worktrees and branches of a repository."""

    def require(self) -> None:
        """EnvironmentProblem when git cannot be run here; nothing is run to find out."""
        ...

    def version(self) -> str:
        """git's version; raises EnvironmentProblem when git is missing."""
        ...

    def toplevel(self, path: Path) -> Path:
        """The repository's top level; EnvironmentProblem when path is not in a git repo."""
        ...

    def head_ref(self, repo: Path) -> str:
        """The current branch name (the commit id when HEAD is detached)."""
        ...

    def ref_exists(self, repo: Path, ref: str) -> bool: ...

    def branch_exists(self, repo: Path, branch: str) -> bool: ...

    def is_worktree(self, repo: Path, path: Path) -> bool:
        """Whether path is registered as a worktree of repo."""
        ...

    def branch_holder(self, repo: Path, branch: str) -> Path | None:
        """The worktree that has branch checked out, or None."""
        ...

    def branch_tip(self, repo: Path, branch: str) -> str:
        """The commit id the local branch points at."""
        ...

    def add(self, repo: Path, path: Path, branch: str, base: str, *, new_branch: bool) -> bool:
        """`git worktree add` (per-repository lock, --no-track); True when it did the work."""
        ...

    def switch(self, repo: Path, worktree: Path, branch: str, start: str | None = None) -> bool:
        """Put an existing worktree on `branch` (made from `start`); True when it is."""
        ...

    def remove(self, repo: Path, path: Path) -> None:
        """Remove a worktree even if locked or half made; idempotent."""
        ...

    def delete_branch(self, repo: Path, branch: str) -> None:
        """Delete a branch; a branch already gone is not an error."""
        ...

    def commits_ahead(self, repo: Path, base: str, branch: str) -> int: ...

    def has_changes(self, worktree: Path) -> bool:
        """Uncommitted changes or untracked files in the worktree."""
        ...

    def list_worktrees(self, repo: Path) -> list[Path]: ...
