"""The integration tests' own fixtures, beside the suite-wide ones in tests/conftest.py."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def on_each_backend(backend: str) -> str:
    """Every test here runs on SQLite and on PostgreSQL (SPEC §10), unless `sqlite_only`."""
    return backend
