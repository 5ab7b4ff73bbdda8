"""The task list's JSON, kept between requests.

A page asks for the whole list on every load and reconnect, and with 10,000 tasks
shaping and encoding them cost more than reading them. Two things are kept:

- per filter, the last answer, with the database version it was read at: while
  nothing has been committed since (SQLite says so for the cost of one pragma), it
  is the answer;
- each row's text, under the row exactly as stored: a row read the same gives the
  same JSON, so only the rows read differently are shaped again.

Both are kept for the few filters asked last (pages open side by side each ask their
own), and only the rows of those answers: memory follows the list, not its history.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
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


# The statuses asked for (sorted) and whether closed tasks count.
Asked = tuple[tuple[str, ...], bool]
# How many filters' answers are kept: a few pages open at once, each with its own.
KEPT_FILTERS = 4


@dataclass(frozen=True)
class _Answer:
    version: Hashable | None  # None: the executor cannot tell, so it is read every time
    body: bytes
    texts: dict[StoredRow, bytes]  # each of its rows' JSON


class BoardJson:
    def __init__(self) -> None:
        self._answers: OrderedDict[Asked, _Answer] = OrderedDict()  # asked last at the end
        self._lock = threading.Lock()

    def answer(self, app: App, statuses: Sequence[str], include_closed: bool) -> bytes:
        """`GET /api/tasks`: the JSON array of the board's rows."""
        asked: Asked = (tuple(sorted(set(statuses))), include_closed)
        with self._lock:
            last = self._answers.get(asked)
            # A row has one text whichever answer holds it: the order only saves lookups.
            pools = [kept.texts for kept in reversed(self._answers.values())]
        since = None if last is None else last.version
        board = stored_board(app, statuses, include_closed, unchanged_since=since)
        if board.rows is None:  # unchanged since `since`, which only `last` can be
            assert last is not None
            with self._lock:
                if asked in self._answers:
                    self._answers.move_to_end(asked)
            return last.body
        texts: dict[StoredRow, bytes] = {}
        for row in board.rows:
            for pool in pools:
                if (text := pool.get(row)) is not None:
                    break
            else:
                text = _encode(row)
            texts[row] = text
        # In the rows' order: each row holds its task's id, so none is a duplicate.
        body = b"[" + b",".join(texts.values()) + b"]"
        with self._lock:
            self._answers[asked] = _Answer(board.version, body, texts)
            self._answers.move_to_end(asked)
            while len(self._answers) > KEPT_FILTERS:
                self._answers.popitem(last=False)
        return body
