"""The CLI tests run on both backends, as the integration tests do."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def on_each_backend(backend: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL (SPEC §10), unless `sqlite_only`."""
    return backend
