"""Every test runs isolated: its own DISPATCH_HOME, config, tmux server and git identity."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from libtmux import Server
from libtmux.exc import LibTmuxException

from dispatch.app import App
from dispatch.config import load_settings

# Resolved once: a test may put a failing `tmux` shim first on PATH, teardown must not use it.
TMUX = shutil.which("tmux") or "tmux"


@dataclass
class Env:
    """Where this test's dispatch lives."""

    home: Path
    config: Path
    socket: str
    root: Path
    tmux_server: Server

    def write_config(self, text: str) -> None:
        self.config.write_text(text, encoding="utf-8")

    @property
    def db_path(self) -> Path:
        return self.home / "dispatch.db"


# Fast enough for tests, still the real mechanisms: a real wrapper must acknowledge.
BASE_CONFIG = """\
spawn_timeout = 10
heartbeat_interval = 1
lease_seconds = 30
"""


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: Server) -> Iterator[Env]:
    """Isolated settings, home and git identity; the tmux server is libtmux's pytest
    plugin's `server`: a socket of its own, killed (and its socket file removed) after."""
    home = tmp_path / "dispatch-home"
    fake_home = tmp_path / "user-home"
    fake_home.mkdir()
    config = tmp_path / "config.toml"
    config.write_text(BASE_CONFIG, encoding="utf-8")
    socket = server.socket_name
    assert socket, "libtmux's test server has a socket name of its own"
    for name in list(os.environ):
        if name.startswith("DISPATCH_") or name == "TMUX":
            monkeypatch.delenv(name)
    monkeypatch.setenv("DISPATCH_HOME", str(home))
    monkeypatch.setenv("DISPATCH_CONFIG", str(config))
    monkeypatch.setenv("DISPATCH_TMUX_SOCKET", socket)
    monkeypatch.setenv("HOME", str(fake_home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(fake_home / ".config"))
    monkeypatch.setenv("XDG_DATA_HOME", str(fake_home / ".local" / "share"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(fake_home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for key, value in {
        "GIT_AUTHOR_NAME": "Dispatch Test",
        "GIT_AUTHOR_EMAIL": "test@dispatch.invalid",
        "GIT_COMMITTER_NAME": "Dispatch Test",
        "GIT_COMMITTER_EMAIL": "test@dispatch.invalid",
    }.items():
        monkeypatch.setenv(key, value)
    yield Env(home=home, config=config, socket=socket, root=tmp_path, tmux_server=server)


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def git() -> Callable[..., str]:
    """git as an independent witness: `git(repo, "branch", "--list")`."""
    return _git


@pytest.fixture
def repo(env: Env) -> Path:
    """A real repository on branch main with one commit."""
    path = env.root / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True)
    _git(path, "config", "commit.gpgsign", "false")
    (path / "README.md").write_text("hello\n")
    _git(path, "add", "README.md")
    _git(path, "commit", "-q", "-m", "initial")
    return path


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


# The fixtures' types, for annotating tests.
Cli = Callable[..., Result]
MakeApp = Callable[..., App]
GitRunner = Callable[..., str]


@pytest.fixture
def cli(env: Env) -> Callable[..., Result]:
    """The real `dispatch` program in a subprocess: `cli("add", "x", cwd=repo)`."""

    def run(
        *args: str,
        cwd: Path | None = None,
        input: str | None = None,
        timeout: float = 60,
        extra_env: dict[str, str] | None = None,
    ) -> Result:
        environ = dict(os.environ)
        environ.update(extra_env or {})
        done = subprocess.run(
            [sys.executable, "-m", "dispatch", *args],
            cwd=cwd or env.root,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            env=environ,
        )
        return Result(done.returncode, done.stdout, done.stderr)

    return run


@pytest.fixture
def make_app(env: Env) -> Iterator[Callable[..., App]]:
    """An App built from this test's settings; keyword arguments inject adapters."""
    built: list[App] = []

    def build(**adapters: Any) -> App:
        app = App(load_settings(), **{f"{k}_": v for k, v in adapters.items()})
        built.append(app)
        return app

    yield build
    for app in built:
        app.close()


def tmux(env: Env, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TMUX, "-L", env.socket, *args], capture_output=True, text=True)


def windows(env: Env) -> list[str]:
    """Window names on the test's tmux server ([] when no server runs)."""
    if not env.tmux_server.is_alive():
        return []
    try:
        return [str(w.window_name) for w in env.tmux_server.windows]
    except LibTmuxException:  # the server went away between the two calls
        return []
