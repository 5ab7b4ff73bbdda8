"""The task list's JSON, kept between requests.

A page asks for the whole list on every load and reconnect, and with 10,000 tasks
shaping and encoding them cost more than reading them. Two things are kept:

- the last answer, with the database version it was read at: while nothing has been
  committed since (SQLite says so for the cost of one pragma), it is the answer;
- each row's text, under the row exactly as stored: a row read the same gives the
  same JSON, so only the rows read differently are shaped again. Only the rows of the
  last answer are kept, so memory follows the list, not its history.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from dispatch.app import App
from dispatch.services.monitor import board_row, stored_board
from dispatch.shapes import attempt_json, task_json
from dispatch.store.pages import StoredRow


def _encode(row: StoredRow) -> bytes:
    shown = board_row(row)
    data = task_json(shown.task)
    data["attempt"] = attempt_json(shown.attempt) if shown.attempt else None
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class _Answer:
    asked: tuple[tuple[str, ...], bool]  # the statuses and whether closed tasks count
    version: Hashable
    body: bytes


class BoardJson:
    def __init__(self) -> None:
        self._kept: dict[StoredRow, bytes] = {}
        self._answer: _Answer | None = None
        self._lock = threading.Lock()

    def answer(self, app: App, statuses: Sequence[str], include_closed: bool) -> bytes:
        """`GET /api/tasks`: the JSON array of the board's rows."""
        asked = (tuple(sorted(set(statuses))), include_closed)
        with self._lock:
            last = self._answer
        since = last.version if last is not None and last.asked == asked else None
        board = stored_board(app, statuses, include_closed, unchanged_since=since)
        if board.rows is None:  # unchanged since `since`, which only `last` can be
            assert last is not None
            return last.body
        body = self.encode(board.rows)
        with self._lock:
            if board.version is not None:
                self._answer = _Answer(asked, board.version, body)
        return body

    def encode(self, rows: Sequence[StoredRow]) -> bytes:
        """The JSON array of `rows`, byte for byte what one `json.dumps` of them gives."""
        with self._lock:
            kept = self._kept
        fresh: dict[StoredRow, bytes] = {}
        parts = []
        for row in rows:
            text = kept.get(row)
            if text is None:
                text = _encode(row)
            fresh[row] = text
            parts.append(text)
        with self._lock:
            self._kept = fresh
        return b"[" + b",".join(parts) + b"]"
