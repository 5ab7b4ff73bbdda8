"""A private PostgreSQL server for the tests: initdb in a temporary directory, a Unix
socket only (no TCP), one database per test. Where PostgreSQL or psycopg is not
installed, the tests that need it skip; `.ci/run` installs both."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from uuid import uuid4


def _server_binaries() -> Path | None:
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    found = versions[0] if versions else shutil.which("initdb")
    return Path(found).parent if found else None


class Server:
    """A throwaway PostgreSQL cluster; PostgreSQL refuses to run as root, so as root it
    runs as the `postgres` user."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.root = Path(tempfile.mkdtemp(prefix="dispatch-pg-"))
        self.socket_dir = self.root / "socket"
        self.socket_dir.mkdir()
        self.owner: pwd.struct_passwd | None = None
        self._template: str | None = None
        if os.getuid() == 0:
            self.owner = pwd.getpwnam("postgres")
            for path in (self.root, self.socket_dir):
                os.chown(path, self.owner.pw_uid, self.owner.pw_gid)

    def _run(self, *argv: str) -> None:
        command = [str(self.binaries / argv[0]), *argv[1:]]
        as_user: dict[str, Any] = {}
        if self.owner is not None:
            owner = self.owner
            as_user = {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=120, cwd=self.root, **as_user
        )
        assert done.returncode == 0, done.stderr or done.stdout

    def start(self) -> None:
        data = str(self.root / "data")
        self._run("initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync")
        options = f"-k {self.socket_dir} -c listen_addresses='' -c fsync=off"
        self._run("pg_ctl", "-D", data, "-o", options, "-l", str(self.root / "log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@/{database}?host={self.socket_dir}"

    def create_database(self, template: str | None = None) -> str:
        """A new database: empty, or a copy of `template` (a database's name)."""
        import psycopg

        name = f"dispatch_{uuid4().hex[:12]}"
        libpq = f"postgresql://postgres@/postgres?host={self.socket_dir}"
        with psycopg.connect(libpq, autocommit=True) as conn:
            copy = f" TEMPLATE {template}" if template else ""
            conn.execute(f"CREATE DATABASE {name}{copy}")
        return self.url(name)

    def migrated_template(self) -> str:
        """The name of a database at the schema's head, made once: copying it is much
        quicker than migrating each test's database."""
        if self._template is None:
            from dispatch.store.database import Database

            url = self.create_database()
            database = Database(url)
            database.upgrade()
            database.engine.dispose()
            self._template = url.split("://postgres@/", 1)[1].split("?", 1)[0]
        return self._template


def start_server() -> Server | str:
    """A running server, or why there cannot be one here."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed"
    binaries = _server_binaries()
    if binaries is None:
        return "PostgreSQL is not installed"
    if os.getuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a `postgres` user to run the server"
    running = Server(binaries)
    running.start()
    return running
