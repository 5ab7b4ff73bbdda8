"""What one command line carries from parsing to rendering: its global options, whether
it speaks JSON, and the App it builds on first use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

    from dispatch.app import App


@dataclass
class Invocation:
    """The typer context's `obj` for one run of the CLI."""

    json: bool = False
    db: str | None = None
    config: str | None = None
    _app: App | None = field(default=None, repr=False)

    def app(self) -> App:
        """The App for these options, built once (settings are read on first need)."""
        if self._app is None:
            from dispatch.app import App
            from dispatch.config import load_settings

            self._app = App(load_settings(config=self.config, db=self.db))
        return self._app

    def close(self) -> None:
        if self._app is not None:
            self._app.close()


def invocation(ctx: typer.Context) -> Invocation:
    """The invocation a command runs in (the root context's `obj`)."""
    root = ctx.find_root()
    if not isinstance(root.obj, Invocation):
        root.obj = Invocation()
    return root.obj
