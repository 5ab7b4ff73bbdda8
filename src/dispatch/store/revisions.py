"""The schema revisions this code knows, importable without SQLAlchemy or Alembic."""

from __future__ import annotations

# Kept equal to Alembic's history by a test, so the common case (schema current) never
# pays Alembic's import.
KNOWN_REVISIONS = ("0001", "0002", "0003")
HEAD_REVISION = KNOWN_REVISIONS[-1]
