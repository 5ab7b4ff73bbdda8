"""Storage: the statements services run, how they run, the models, migrations and engine."""

from __future__ import annotations
