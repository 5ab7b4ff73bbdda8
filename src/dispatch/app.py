"""The composition root: builds the database and the adapters from settings, once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dispatch.config import Settings

if TYPE_CHECKING:
    from dispatch.adapters.protocols import Terminal, Worktrees
    from dispatch.store.database import Database
    from dispatch.store.direct import Direct


@dataclass
class App:
    """What services need; heavy pieces are built on first use so `--help` stays fast."""

    settings: Settings
    db_: Database | None = field(default=None, repr=False)
    worktrees_: Worktrees | None = field(default=None, repr=False)
    terminal_: Terminal | None = field(default=None, repr=False)
    direct_: Direct | None = field(default=None, repr=False)

    @property
    def db(self) -> Database:
        if self.db_ is None:
            from dispatch.store.database import Database

            _refuse_if_replaced(self.settings.database)
            self.db_ = Database(self.settings.database)
        return self.db_

    @property
    def direct(self) -> Direct:
        """Where services run their statements: without SQLAlchemy when the database allows."""
        if self.direct_ is None:
            from dispatch.store.direct import open_direct

            self.direct_ = open_direct(self.settings.database, lambda: self.db)
        return self.direct_

    @property
    def worktrees(self) -> Worktrees:
        if self.worktrees_ is None:
            from dispatch.adapters.git import GitWorktrees

            self.worktrees_ = GitWorktrees(self.settings.locks_dir)
        return self.worktrees_

    @property
    def terminal(self) -> Terminal:
        if self.terminal_ is None:
            from dispatch.adapters.tmux import TmuxTerminal

            self.terminal_ = TmuxTerminal(self.settings.tmux_socket or None)
        return self.terminal_

    def terminal_for(self, socket: str | None) -> Terminal:
        """The tmux server named `socket`: an attempt's own, whatever this process's setting."""
        if (socket or "") == (self.settings.tmux_socket or ""):
            return self.terminal
        from dispatch.adapters.tmux import TmuxTerminal

        return TmuxTerminal(socket or None)

    def close(self) -> None:
        if self.direct_ is not None:
            self.direct_.close()
        if self.db_ is not None:
            self.db_.dispose()


def _refuse_if_replaced(url: str) -> None:
    """A missing SQLite file that agents of this host still run against was deleted or
    moved under them: a new empty database would silently forget their tasks and take
    their exits as writes to nothing. Refuse, and name them, before one is created."""
    path = Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None
    if path is None or path.exists():
        return
    from dispatch.adapters.processes import attempt_processes
    from dispatch.errors import EnvironmentProblem

    marker = (b"\0DISPATCH_ATTEMPT_ID=", f"\0DISPATCH_DB={url}\0".encode())
    agents = attempt_processes(marker)
    if agents:
        pids = " ".join(map(str, sorted(agents)))
        raise EnvironmentProblem(
            f"database {path} is missing, but agents (pids {pids}) still run against it: "
            "it was deleted or replaced under them; nothing was created",
            hint="put the file back, or stop those agents first",
        )
