"""Adapters: one per external program, each behind a small Protocol (see `protocols`)."""

from __future__ import annotations
