"""Use cases: each owns its transactions and returns plain results for the CLI to render."""

from __future__ import annotations
