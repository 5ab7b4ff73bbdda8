"""The adapter tests' names for the suite-wide fixtures in tests/conftest.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Env

GitRunner = Callable[..., str]


@pytest.fixture
def run_git(git: GitRunner) -> GitRunner:
    """git as the tests' own independent witness, not through the adapter under test."""
    return git


@pytest.fixture
def git_repo(repo: Path) -> Path:
    """A fresh repository on branch main with one commit, isolated from the user's git config."""
    return repo


@pytest.fixture
def tmux_socket(env: Env) -> str:
    """The test's private tmux server; the suite's `env` fixture kills it afterwards."""
    return env.socket


@pytest.fixture(autouse=True)
def on_each_backend(backend: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL (SPEC §10), unless `sqlite_only`."""
    return backend
