"""The composition root: builds the database and the adapters from settings, once."""

from __future__ import annotations

from dataclasses import dataclass, field
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
