"""`dispatch doctor`: is everything dispatch relies on here and working?"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

from dispatch.app import App
from dispatch.config import BUILTIN_AGENTS
from dispatch.errors import DispatchError


@dataclass(frozen=True)
class Check:
    name: str
    detail: str
    ok: bool


def run_checks(make_app: Callable[[], App]) -> list[Check]:
    """Every check runs, whatever failed before it, so one run shows every problem."""
    checks: list[Check] = []
    try:
        app = make_app()  # reads the settings: a config that does not load is the finding
    except DispatchError as exc:
        return [Check("config", exc.message, False)]
    settings = app.settings
    where = str(settings.config_path) if settings.config_path else "defaults (no config file)"
    checks.append(Check("config", where, True))
    checks.append(_check("tmux", lambda: app.terminal.version()))
    checks.append(_check("git", lambda: app.worktrees.version()))
    checks.append(_check("database", lambda: _database(app)))
    checks.append(_check("migrations", lambda: _migrations(app)))
    # The default agent and those the config defines: builtins nobody uses need not be installed.
    names = {settings.default_agent} | {
        n for n, p in settings.agents.items() if BUILTIN_AGENTS.get(n) != p
    }
    for name in sorted(names):
        program = settings.agents[name].command[0]
        found = shutil.which(program)
        detail = found or f"{program!r} not found on PATH"
        checks.append(Check(f"agent {name}", detail, found is not None))
    return checks


def _check(name: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(name, probe(), True)
    except DispatchError as exc:
        return Check(name, exc.message, False)
    except Exception as exc:  # a check reports; it never crashes the doctor
        return Check(name, f"{type(exc).__name__}: {exc}", False)


def _database(app: App) -> str:
    app.db.ensure_schema()
    return app.db.url.render_as_string(hide_password=True)


def _migrations(app: App) -> str:
    from dispatch.store.revisions import HEAD_REVISION

    current = app.db.current_revision()
    if current != HEAD_REVISION:
        raise DispatchError(f"at {current}, head is {HEAD_REVISION}")
    return f"at head ({current})"
