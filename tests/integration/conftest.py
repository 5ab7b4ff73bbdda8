"""Fixtures for tests against real programs: a git repository and a private tmux server."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import uuid4

import pytest

GitRunner = Callable[..., str]


def _run_git(repo: Path, *args: str) -> str:
    """Run git in repo for test set-up and checks; its stdout."""
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return result.stdout


@pytest.fixture
def run_git() -> GitRunner:
    """git as the tests' own independent witness, not through the adapter under test."""
    return _run_git


@pytest.fixture
def git_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh repository on branch main with one commit, isolated from the user's git config."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    # Repository discovery must never climb out of tmp_path into an enclosing repository.
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    _run_git(repo, "config", "user.name", "Dispatch Test")
    _run_git(repo, "config", "user.email", "test@dispatch.invalid")
    _run_git(repo, "config", "commit.gpgsign", "false")
    (repo / "README.md").write_text("hello\n")
    _run_git(repo, "add", "README.md")
    _run_git(repo, "commit", "-q", "-m", "initial")
    return repo


@pytest.fixture
def tmux_socket() -> Iterator[str]:
    """A socket name no one else uses; its server (if any was started) is killed afterwards."""
    name = f"dispatch-test-{uuid4().hex[:8]}"
    # Found now: a test may take tmux off PATH before this teardown runs.
    tmux = shutil.which("tmux") or "tmux"
    yield name
    subprocess.run([tmux, "-L", name, "kill-server"], capture_output=True, check=False)
    # tmux leaves its socket file behind; without this, every run adds a few dozen.
    socket_dir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
    (socket_dir / name).unlink(missing_ok=True)
