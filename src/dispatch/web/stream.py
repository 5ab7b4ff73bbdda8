"""The event stream: one watcher reads new rows of the events table for every client.

Each tick costs one `id > ?` query whatever the number of open pages; each client
gets its frames through its own bounded queue. A client that falls too far behind
is disconnected and resumes with `Last-Event-ID`, so it never misses a row.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from dispatch.store.statements import EventRow

POLL_SECONDS = 0.5
KEEPALIVE_SECONDS = 15.0
QUEUE_LIMIT = 10_000
BATCH = 1000

Fetch = Callable[[int, int | None, int], list[EventRow]]  # after, task, limit


@dataclass(eq=False)
class _Client:
    task_id: int | None
    queue: asyncio.Queue[EventRow | None] = field(default_factory=asyncio.Queue)


class Feed:
    """The shared watcher and its subscribers."""

    def __init__(self, fetch: Fetch, last_id: Callable[[], int]) -> None:
        self._fetch = fetch
        self._last_id = last_id
        self._clients: set[_Client] = set()
        self._seen = 0  # the newest event id handed to clients
        self._closed = False
        self._problem = ""

    async def prime(self) -> None:
        """Start from the newest event: awaited before the first request is served, so a
        stream opened without `Last-Event-ID` never replays the whole log."""
        self._seen = await run_in_threadpool(self._last_id)

    async def run(self) -> None:
        """Poll until `close`, also while nobody listens: the watcher's position stays
        current, so a stream opened later starts from now, not from an hour ago."""
        while not self._closed:
            try:
                rows = await run_in_threadpool(self._fetch, self._seen, None, BATCH)
                self._problem = ""
            except Exception as exc:  # a locked or vanished database: say so once, keep on
                if str(exc) != self._problem:
                    sys.stderr.write(f"dispatch: warning: event stream: {exc}\n")
                self._problem = str(exc)
                rows = []
            for row in rows:
                self._publish(row)
            if len(rows) < BATCH:
                await asyncio.sleep(POLL_SECONDS)

    def _publish(self, row: EventRow) -> None:
        self._seen = row.id
        for client in list(self._clients):
            if client.task_id is not None and row.task_id != client.task_id:
                continue
            if client.queue.qsize() >= QUEUE_LIMIT:
                self._drop(client)
            else:
                client.queue.put_nowait(row)

    def _drop(self, client: _Client) -> None:
        self._clients.discard(client)
        client.queue.put_nowait(None)

    def close(self) -> None:
        """End every stream (the server is stopping) and the watcher."""
        self._closed = True
        for client in list(self._clients):
            self._drop(client)

    async def frames(self, after: int | None, task_id: int | None) -> AsyncIterator[str]:
        """SSE frames from just after event `after` (None: from now on), then live."""
        client = _Client(task_id)
        # Subscribed and marked in one step (no await between): the queue gets every
        # row after `mark`, the backlog read covers (after, mark].
        self._clients.add(client)
        mark = self._seen
        sent = mark if after is None else after
        try:
            yield ": connected\n\n"  # the page knows the stream is up before any event
            while sent < mark:
                rows = await run_in_threadpool(self._fetch, sent, task_id, BATCH)
                rows = [r for r in rows if r.id <= mark]
                if not rows:
                    break
                # One write a batch: a client that went away is noticed at the next read,
                # not after a write for every row (each of which asyncio logs).
                yield "".join(map(frame, rows))
                sent = rows[-1].id
            while True:
                try:
                    new = await asyncio.wait_for(client.queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keep-alive\n\n"  # proxies close streams that stay silent
                    continue
                if new is None:
                    return
                if new.id > sent:
                    yield frame(new)
                    sent = new.id
        finally:
            self._clients.discard(client)


def frame(row: EventRow) -> str:
    from dispatch.shapes import event_json

    data: dict[str, Any] = event_json(row)
    return f"id: {row.id}\nevent: {row.kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
