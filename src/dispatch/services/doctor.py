"""`dispatch doctor`: is everything dispatch relies on here and working?"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from dispatch.app import App
from dispatch.config import BUILTIN_AGENTS
from dispatch.errors import DispatchError
from dispatch.lifecycle import AttemptState


@dataclass(frozen=True)
class Check:
    name: str
    detail: str
    ok: bool


def run_checks(make_app: Callable[[], App], without_config: Callable[[], App]) -> list[Check]:
    """Every check runs, whatever failed before it, so one run shows every problem.

    A config that does not load is a finding too: then tmux and git, which need
    nothing from it, are checked on `without_config`'s settings (the defaults and
    the environment); the database, the host and the agents are named by the config,
    so they are not checked."""
    try:
        app = make_app()  # reads the settings
    except DispatchError as exc:
        defaults = without_config()
        try:
            return [Check("config", exc.message, False), *_programs(defaults)]
        finally:
            defaults.close()
    settings = app.settings
    where = str(settings.config_path) if settings.config_path else "defaults (no config file)"
    checks = [Check("config", where, True), *_programs(app)]
    checks.append(_check("database server", lambda: _server(app)))
    checks.append(_check("database", lambda: _database(app)))
    checks.append(_check("migrations", lambda: _migrations(app)))
    checks.append(_check("host", lambda: _host_identity(app)))
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


def _programs(app: App) -> list[Check]:
    return [
        _check("tmux", lambda: app.terminal.health(app.settings.tmux_session)),
        _check("git", lambda: app.worktrees.version()),
    ]


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


# `FOR UPDATE SKIP LOCKED`, which claims on PostgreSQL rely on, came with 9.5.
POSTGRESQL_AT_LEAST = (9, 5)


def _server(app: App) -> str:
    """The server answers, and is new enough: before the schema, so an unreachable
    server is said as such rather than as a migration problem."""
    found = app.db.server_version()
    if found.startswith("PostgreSQL "):
        numbers = tuple(int(n) for n in re.findall(r"\d+", found)[:2])
        if numbers < POSTGRESQL_AT_LEAST:
            need = ".".join(map(str, POSTGRESQL_AT_LEAST))
            raise DispatchError(f"{found}: dispatch needs PostgreSQL {need} or newer")
    return found


def _host_identity(app: App) -> str:
    """No other live machine records attempts under this host's name (a copied config):
    this host's sweep and reads would judge those by a tmux server they are not on, and
    reap live agents. Found as running attempts under this name that heartbeat but whose
    wrapper is on no tmux server here."""
    from dispatch.clock import utcnow
    from dispatch.services.panes import Panes
    from dispatch.store import statements as st

    settings = app.settings
    live = app.direct.read(lambda tx: st.live_here(tx, settings.host))
    running = [a for a in live if a.state == AttemptState.RUNNING.value]
    # Younger than two beats (and some slack): a wrapper is beating right now, somewhere.
    fresh = utcnow() - timedelta(seconds=2 * settings.heartbeat_interval + 5)
    listings: dict[str, Panes] = {}
    strangers = []
    for attempt in running:
        socket = attempt.tmux_socket or ""
        if socket not in listings:
            listings[socket] = Panes.of(app.terminal_for(socket).list_panes())
        beat = attempt.heartbeat_at
        if listings[socket].of_attempt(attempt) is None and beat is not None and beat > fresh:
            server = f"tmux server {socket!r}" if socket else "the default tmux server"
            strangers.append(f"attempt {attempt.id} ({attempt.tmux_target} on {server})")
    if strangers:
        raise DispatchError(
            f"{settings.host!r} is also used by another live host: "
            f"{', '.join(strangers)} heartbeats but is on no tmux server here; "
            "give each host its own DISPATCH_HOST"
        )
    return f"{settings.host} ({len(running)} running attempts here)"
