"""The event stream's shared watcher, over a fake events table: fan-out and resumption."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from dispatch.store.statements import EventRow
from dispatch.web import stream
from dispatch.web.stream import Feed


class Table:
    """An events table that counts how often it is read."""

    def __init__(self, count: int = 0) -> None:
        self.rows: list[EventRow] = []
        self.reads: list[tuple[int, int | None]] = []
        for _ in range(count):
            self.add(1)

    def add(self, task_id: int) -> EventRow:
        row = EventRow(len(self.rows) + 1, task_id, None, "created", None, "ready",
                       datetime.now(UTC), {})  # fmt: skip
        self.rows.append(row)
        return row

    def fetch(self, after: int, task_id: int | None, limit: int) -> list[EventRow]:
        self.reads.append((after, task_id))
        found = [r for r in self.rows if r.id > after and task_id in (None, r.task_id)]
        return found[:limit]

    def last_id(self) -> int:
        return len(self.rows)


async def _frames(feed: Feed, after: int | None, task: int | None, count: int) -> list[str]:
    ids = []
    async for text in feed.frames(after, task):
        # A backlog comes a batch of frames at a time.
        for part in text.split("\n\n"):
            if part.startswith("id: "):
                ids.append(part.split("\n", 1)[0].removeprefix("id: "))
        if len(ids) >= count:
            return ids[:count]
    return ids


def test_one_read_per_tick_whatever_the_number_of_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "POLL_SECONDS", 0.05)
    table = Table(3)

    async def scenario() -> tuple[list[list[str]], int]:
        feed = Feed(table.fetch, table.last_id)
        await feed.prime()
        watcher = asyncio.create_task(feed.run())
        clients = [asyncio.create_task(_frames(feed, None, None, 2)) for _ in range(20)]
        await asyncio.sleep(0.2)
        table.reads.clear()
        table.add(1)
        table.add(2)
        got = await asyncio.wait_for(asyncio.gather(*clients), 5)
        await asyncio.sleep(0.2)
        feed.close()
        await watcher
        return got, len(table.reads)

    got, reads = asyncio.run(scenario())
    assert got == [["4", "5"]] * 20  # every client, only what came after it connected
    assert reads <= 12  # ~0.4 s of 0.05 s ticks for 20 clients: one read a tick, not 20


def test_resuming_replays_exactly_what_was_missed_then_goes_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(stream, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(stream, "BATCH", 2)  # the backlog comes in several reads
    table = Table(5)

    async def scenario() -> tuple[list[str], list[str]]:
        feed = Feed(table.fetch, table.last_id)
        await feed.prime()
        watcher = asyncio.create_task(feed.run())
        resumed = asyncio.create_task(_frames(feed, 1, None, 5))
        of_task = asyncio.create_task(_frames(feed, 0, 2, 1))
        await asyncio.sleep(0.1)
        table.add(1)
        table.add(2)
        result = await asyncio.wait_for(asyncio.gather(resumed, of_task), 5)
        feed.close()
        await watcher
        return result[0], result[1]

    resumed, of_task = asyncio.run(scenario())
    assert resumed == ["2", "3", "4", "5", "6"]  # after 1, none twice, none skipped
    assert of_task == ["7"]


def test_closing_ends_every_stream() -> None:
    table = Table(1)

    async def scenario() -> list[str]:
        feed = Feed(table.fetch, table.last_id)
        await feed.prime()
        client = asyncio.create_task(_frames(feed, None, None, 1))
        await asyncio.sleep(0.05)
        feed.close()
        return await asyncio.wait_for(client, 5)

    assert asyncio.run(scenario()) == []


def test_a_quiet_stream_gets_a_comment_line_to_stay_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "KEEPALIVE_SECONDS", 0.1)
    table = Table(1)

    async def scenario() -> list[str]:
        feed = Feed(table.fetch, table.last_id)
        await feed.prime()
        texts = []
        async for text in feed.frames(None, None):
            texts.append(text)
            if len(texts) == 3:
                break
        return texts

    assert asyncio.run(scenario()) == [": connected\n\n", ": keep-alive\n\n", ": keep-alive\n\n"]
