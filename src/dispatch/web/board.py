"""The task list's JSON, kept row by row between requests.

A page asks for the whole list on every load and reconnect, and with 10,000 tasks
shaping and encoding them cost more than reading them. Between two requests few rows
change, and a row read the same gives the same JSON: each row's text is kept under the
row exactly as stored, and only rows read differently are shaped again. Only the rows
of the last answer are kept, so memory follows the list, not its history.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

from dispatch.services.monitor import StoredRow, board_row
from dispatch.shapes import attempt_json, task_json


def _encode(row: StoredRow) -> bytes:
    shown = board_row(row)
    data = task_json(shown.task)
    data["attempt"] = attempt_json(shown.attempt) if shown.attempt else None
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


class BoardJson:
    def __init__(self) -> None:
        self._kept: dict[StoredRow, bytes] = {}
        self._lock = threading.Lock()

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
