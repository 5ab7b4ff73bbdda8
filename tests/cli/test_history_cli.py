"""`list`, `events` and `show` on a long history: limits and the line saying how many
more, filters, streamed JSON, and `events --follow` (SPEC §5)."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import pytest

from tests.cli.inprocess import InProcess
from tests.conftest import Env, Result

# Thousands of rows seeded with sqlite3: for the suite's time, the listing's SQL runs on
# PostgreSQL through test_tasks_cli.py and the fleet test.
pytestmark = pytest.mark.one_backend

Cli = Callable[..., Result]
STAMP = "%Y-%m-%d %H:%M:%S.%f"


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: Env) -> Cli:
    return InProcess(capsys, monkeypatch, env)


def _first(cli: Cli, repo: Path) -> None:
    """A real `add`, which creates and migrates the database the rest is seeded into."""
    done = cli("add", "first", "--agent", "shell", cwd=repo)
    assert done.code == 0, done.stderr


def _seed_tasks(env: Env, count: int, **columns: object) -> None:
    now = datetime.now(UTC).strftime(STAMP)
    values = {
        "title": "seeded", "prompt": "p", "repo": "/elsewhere", "agent": "shell",
        "base_ref": "main", "priority": 0, "status": "ready", "dispatch_failures": 0,
        "created_at": now, "updated_at": now, **columns,
    }  # fmt: skip
    sql = f"INSERT INTO tasks ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})"
    with closing(sqlite3.connect(env.db_path)) as conn, conn:
        conn.executemany(sql, [tuple(values.values())] * count)


def _seed_events(env: Env, task_id: int, count: int, at: datetime | None = None) -> None:
    stamp = (at or datetime.now(UTC)).strftime(STAMP)
    detail = json.dumps({"n": "ünï"})
    sql = "INSERT INTO events (task_id, kind, at, detail) VALUES (?, 'note', ?, ?)"
    with closing(sqlite3.connect(env.db_path)) as conn, conn:
        conn.executemany(sql, [(task_id, stamp, detail)] * count)


def _table_rows(stdout: str) -> list[list[str]]:
    header, *rows = stdout.splitlines()
    assert header.split()[0] == "ID"
    return [row.split() for row in rows]


# -- list ----------------------------------------------------------------------------------


def test_the_list_table_shows_100_tasks_then_says_how_many_more(
    cli: Cli, repo: Path, env: Env
) -> None:
    _first(cli, repo)
    _seed_tasks(env, 104)
    _seed_tasks(env, 1, priority=9, title="urgent")
    table = cli("list")
    assert table.code == 0, table.stderr
    rows = _table_rows(table.stdout)
    assert len(rows) == 100
    assert rows[0][:6] == ["106", "ready", "9", "shell", "-", "urgent"]  # the usual order
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 100))
    assert "6 more tasks match; `--limit 0` shows all" in table.stderr

    few = cli("list", "--limit", "3")
    assert [r[0] for r in _table_rows(few.stdout)] == ["106", "1", "2"]
    assert "103 more tasks match" in few.stderr
    everything = cli("list", "--limit", "0")
    assert len(_table_rows(everything.stdout)) == 106
    assert "more" not in everything.stderr


def test_list_json_is_every_task_unless_limited(cli: Cli, repo: Path, env: Env) -> None:
    _first(cli, repo)
    _seed_tasks(env, 1299)  # more than one batch of rows and of writes
    listed = cli("list", "--json")
    assert listed.code == 0, listed.stderr
    assert [t["id"] for t in listed.json()] == list(range(1, 1301))
    limited = cli("list", "--json", "--limit", "2").json()
    assert [t["id"] for t in limited] == [1, 2]
    assert cli("list", "--json", "--status", "done").stdout == "[]\n"


def test_list_filters_by_repo_agent_and_latest_host(cli: Cli, repo: Path, env: Env) -> None:
    _first(cli, repo)  # task 1: in `repo`
    _seed_tasks(env, 2, agent="codex")  # tasks 2, 3: elsewhere
    now = datetime.now(UTC).strftime(STAMP)
    sql = (
        "INSERT INTO attempts (task_id, number, state, prior_status, host, resume, intent,"
        " started_at) VALUES (?, ?, 'ended', 'ready', ?, 0, '{}', ?)"
    )
    with closing(sqlite3.connect(env.db_path)) as conn, conn:
        conn.executemany(sql, [(2, 1, "alpha", now), (2, 2, "beta", now), (3, 1, "alpha", now)])

    def ids(*args: str) -> list[int]:
        done = cli("list", "--json", *args)
        assert done.code == 0, done.stderr
        return [t["id"] for t in done.json()]

    assert ids("--repo", str(repo)) == [1]
    assert ids("--repo", "/elsewhere") == [2, 3]
    assert ids("--agent", "codex") == [2, 3]
    assert ids("--agent", "codex", "--repo", str(repo)) == []
    assert ids("--host", "alpha") == [3]  # task 2's latest attempt ran on beta
    assert ids("--host", "beta") == [2]
    assert ids("--host", "gamma") == []
    table = cli("list", "--host", "alpha")
    assert [r[0] for r in _table_rows(table.stdout)] == ["3"]


def test_a_streamed_table_keeps_its_columns_and_prints_every_task(
    cli: Cli, repo: Path, env: Env
) -> None:
    _first(cli, repo)
    _seed_tasks(env, 2500)
    _seed_tasks(env, 1, title="a much longer title than the others have")
    done = cli("list", "--limit", "0")
    lines = done.stdout.splitlines()
    assert len(lines) == 1 + 2502
    status_at = lines[0].index("STATUS")
    assert all(line[status_at:].startswith("ready") for line in lines[1:])
    assert " ".join(lines[-1].split()[5:]) == "a much longer title than the others have"


# -- events --------------------------------------------------------------------------------


def test_events_table_shows_the_newest_200_then_says_how_many_more(
    cli: Cli, repo: Path, env: Env
) -> None:
    _first(cli, repo)  # event 1: created
    _seed_events(env, 1, 249)
    table = cli("events")
    assert table.code == 0, table.stderr
    rows = _table_rows(table.stdout)
    assert [int(r[0]) for r in rows] == list(range(51, 251))  # newest 200, oldest first
    assert "50 earlier events not shown; `--limit 0` shows all" in table.stderr
    assert len(_table_rows(cli("events", "--limit", "0").stdout)) == 250
    json_all = cli("events", "--json").json()
    assert [e["id"] for e in json_all] == list(range(1, 251))
    assert json_all[1]["detail"] == {"n": "ünï"}
    assert json_all[0]["kind"] == "created" and json_all[0]["to_status"] == "ready"


def test_events_after_an_id_and_since_a_time(cli: Cli, repo: Path, env: Env) -> None:
    _first(cli, repo)  # event 1, now
    _seed_events(env, 1, 3, at=datetime.now(UTC) - timedelta(days=3))  # events 2-4
    _seed_events(env, 1, 2, at=datetime.now(UTC) + timedelta(minutes=1))  # events 5-6

    def ids(*args: str) -> list[int]:
        done = cli("events", "--json", *args)
        assert done.code == 0, done.stderr
        return [e["id"] for e in done.json()]

    assert ids("--after", "4") == [5, 6]
    assert ids("--after", "4", "--limit", "1") == [6]
    assert ids("--since", "1d") == [1, 5, 6]  # by time, not by id
    assert ids("--since", "4d") == [1, 2, 3, 4, 5, 6]
    later = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    assert ids("--since", later) == [5, 6]
    assert ids("--since", later.replace("+00:00", "Z")) == [5, 6]
    assert ids("--since", "2099-01-01T00:00:00") == []
    assert ids("--task", "1", "--after", "1", "--since", "1d") == [5, 6]
    bad = cli("events", "--since", "last tuesday")
    assert bad.code == 2 and "--since 'last tuesday'" in bad.stderr


def test_show_gives_the_last_50_events_then_says_how_many_more(
    cli: Cli, repo: Path, env: Env
) -> None:
    _first(cli, repo)
    _seed_events(env, 1, 59)  # 60 events in all
    shown = cli("show", "1")
    assert shown.code == 0, shown.stderr
    assert "10 earlier events not shown; `--events 0` shows all" in shown.stderr
    data = cli("show", "1", "--json").json()
    assert [e["id"] for e in data["events"]] == list(range(11, 61))
    everything = cli("show", "1", "--json", "--events", "0")
    assert len(everything.json()["events"]) == 60 and "earlier" not in everything.stderr
    assert [e["id"] for e in cli("show", "1", "--json", "--events", "3").json()["events"]] == [
        58, 59, 60,
    ]  # fmt: skip


# -- follow --------------------------------------------------------------------------------


def _reader(stream: IO[str], lines: list[str], seen: threading.Event) -> None:
    for text in stream:
        lines.append(text)
        seen.set()


def _wait_lines(lines: list[str], seen: threading.Event, count: int) -> None:
    deadline = 30.0
    while len(lines) < count and deadline > 0:
        seen.wait(0.1)
        seen.clear()
        deadline -= 0.1
    assert len(lines) >= count, lines


@pytest.mark.parametrize("json_mode", [True, False])
def test_follow_prints_events_another_process_writes_until_ctrl_c(
    cli: Cli, repo: Path, env: Env, json_mode: bool
) -> None:
    _first(cli, repo)  # event 1
    args = ["events", "--follow", "--task", "1"] + (["--json"] if json_mode else [])
    errors = env.root / "follow.err"
    lines: list[str] = []
    with errors.open("w") as stderr, subprocess.Popen(
        [sys.executable, "-m", "dispatch", *args],
        stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=env.root,
    ) as proc:  # fmt: skip
        # A table's cancelled row is wider than the columns measured on event 1: the
        # header comes again, above it.
        before, new = (1, 1) if json_mode else (2, 2)
        code = _follow_and_interrupt(proc, repo, env, lines, before, new)
    assert code == 0, errors.read_text()
    if json_mode:
        events = [json.loads(text) for text in lines]  # one JSON object a line
        assert [(e["id"], e["kind"]) for e in events] == [(1, "created"), (3, "cancelled")]
    else:
        assert lines[1].split()[2:5] == ["1", "-", "created"]
        assert lines[2].split() == lines[0].split()  # the header again, wider
        assert lines[3].split()[0] == "3" and "cancelled" in lines[3]
        assert lines[3].index("cancelled") == lines[2].index("KIND")
        assert len(lines) == 4  # task 2's event is not task 1's


def _follow_and_interrupt(
    proc: subprocess.Popen[str], repo: Path, env: Env, lines: list[str], before: int, new: int
) -> int:
    """Wait for `before` lines, write two events from other processes, wait for the `new`
    lines of the one that matches, then Ctrl-C; the exit status."""
    seen = threading.Event()
    assert proc.stdout is not None
    threading.Thread(target=_reader, args=(proc.stdout, lines, seen), daemon=True).start()
    try:
        _wait_lines(lines, seen, before)  # (the header, then) event 1
        # Another process writes: a cancel of task 1, and an event of another task.
        assert (
            subprocess.run(
                [sys.executable, "-m", "dispatch", "add", "other"], cwd=repo, capture_output=True
            ).returncode
            == 0
        )
        assert (
            subprocess.run(
                [sys.executable, "-m", "dispatch", "cancel", "1"], cwd=env.root, capture_output=True
            ).returncode
            == 0
        )
        _wait_lines(lines, seen, before + new)
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    return code
