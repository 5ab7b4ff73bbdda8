"""Storage: SQLAlchemy models, the engine, migrations and the queries services compose."""

from __future__ import annotations
