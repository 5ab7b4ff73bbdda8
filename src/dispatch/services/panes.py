"""Finding an attempt's tmux pane the one way that cannot be fooled: by its wrapper's
`agent-exec ID` start command, on the tmux server the attempt was started on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from dispatch.adapters.protocols import Pane
from dispatch.services.naming import WRAPPER_MARKER


class Located(Protocol):
    """What an attempt row says about where its pane should be."""

    @property
    def id(self) -> int: ...
    @property
    def tmux_session(self) -> str | None: ...
    @property
    def tmux_target(self) -> str | None: ...


def attempt_of(pane: Pane) -> int | None:
    """The attempt a pane's wrapper runs for, from its start command `… agent-exec ID`."""
    parts = pane.start_command.rsplit(" ", 2)
    if len(parts) == 3 and parts[1] == WRAPPER_MARKER and parts[2].isdigit():
        return int(parts[2])
    return None


def window_of(attempt: Located) -> str | None:
    """The window id recorded for the attempt ("@N"), if one was."""
    return attempt.tmux_target.rsplit(":", 1)[-1] if attempt.tmux_target else None


@dataclass
class Panes:
    """One tmux listing, indexed the ways attempts are looked up in it."""

    all: list[Pane]
    by_window: dict[str, Pane]
    by_attempt: dict[int, list[Pane]]

    @classmethod
    def of(cls, panes: list[Pane]) -> Panes:
        by_attempt: dict[int, list[Pane]] = {}
        for pane in panes:
            attempt_id = attempt_of(pane)
            if attempt_id is not None:
                by_attempt.setdefault(attempt_id, []).append(pane)
        return cls(panes, {p.window_id: p for p in panes}, by_attempt)

    def of_attempt(self, attempt: Located) -> Pane | None:
        """The pane running this attempt's wrapper, if there is one."""
        window = window_of(attempt)
        if window is not None:
            pane = self.by_window.get(window)
            # After a tmux server restart a window id can name another window: only a
            # pane that runs this very attempt's wrapper is this attempt's.
            return pane if pane is not None and attempt_of(pane) == attempt.id else None
        # The dispatcher died before it recorded the window: find it by its command.
        for pane in self.by_attempt.get(attempt.id, []):
            if pane.session == attempt.tmux_session:
                return pane
        return None
