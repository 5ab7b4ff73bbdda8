"""The command line: parse, call one service, render. No SQL and no subprocesses here."""

from __future__ import annotations
