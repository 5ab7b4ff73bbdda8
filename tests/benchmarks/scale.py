"""Reads on a year of history (100,000 tasks, 1,000,000 events), each beside a raw
`sqlite3` read of the same rows in the same run.

Seeding is plain INSERTs by executemany into a database one real `dispatch list`
created and migrated: even the store's statements, one row at a time, would take a
minute for a million events.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.benchmarks.harness import (
    BenchError,
    Figure,
    Lab,
    Mode,
    World,
    checked,
    dispatch_argv,
    measure,
    migrate,
    ms,
)

SCALE_TASKS = 100_000
SCALE_EVENTS = 1_000_000
SHOWN_TASK = 7
SHOWN_TASK_EVENTS = 20_000
TABLE_LIMIT = 100  # `dispatch list`'s default
SHOW_LIMIT = 50  # `dispatch show`'s default
STAMP = "%Y-%m-%d %H:%M:%S.%f"

_TASK_COLUMNS = (
    "id, title, status, repo, agent, base_ref, priority, closed_at, last_error,"
    " created_at, updated_at, branch, worktree"
)
# Fresh Pythons doing each read with nothing but sqlite3 and json.
RAW_TABLE = f"""\
import sqlite3, sys
con = sqlite3.connect(sys.argv[1])
rows = con.execute(
    "SELECT id, status, priority, agent, title, last_error FROM tasks"
    " WHERE closed_at IS NULL ORDER BY priority DESC, id LIMIT {TABLE_LIMIT}"
).fetchall()
n = con.execute("SELECT COUNT(*) FROM tasks WHERE closed_at IS NULL").fetchone()[0]
out = ["ID  STATUS  PRI  AGENT  TITLE  LAST ERROR"]
out += ["  ".join("" if v is None else str(v) for v in row) for row in rows]
sys.stdout.write("\\n".join(out) + "\\n")
sys.stderr.write(f"{{n - len(rows)}} more\\n")
"""
RAW_LIST = f"""\
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.row_factory = sqlite3.Row
rows = con.execute(
    "SELECT {_TASK_COLUMNS} FROM tasks WHERE closed_at IS NULL ORDER BY priority DESC, id"
).fetchall()
sys.stdout.write(json.dumps([dict(r) for r in rows]) + "\\n")
"""
RAW_EVENTS = """\
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
write = sys.stdout.write
write("[")
first = True
for row in con.execute(
    "SELECT id, task_id, attempt_id, kind, from_status, to_status, at, detail"
    " FROM events ORDER BY id"
):
    d = dict(zip(("id", "task_id", "attempt_id", "kind", "from_status", "to_status", "at"), row))
    d["detail"] = json.loads(row[7])
    write(("" if first else ", ") + json.dumps(d))
    first = False
write("]\\n")
"""
RAW_SHOW = f"""\
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.row_factory = sqlite3.Row
task = dict(con.execute("SELECT * FROM tasks WHERE id = ?", ({SHOWN_TASK},)).fetchone())
task["attempts"] = [dict(r) for r in con.execute(
    "SELECT * FROM attempts WHERE task_id = ? ORDER BY id", ({SHOWN_TASK},))]
task["events"] = [dict(r) for r in con.execute(
    "SELECT * FROM (SELECT * FROM events WHERE task_id = ? ORDER BY id DESC LIMIT {SHOW_LIMIT})"
    " ORDER BY id", ({SHOWN_TASK},))]
sys.stdout.write(json.dumps(task) + "\\n")
"""


@dataclass
class Run:
    seconds: float
    rss_kb: int  # the process's own peak (VmHWM)
    stderr: str
    out: Path


def _run(argv: list[str], world: World, out: Path) -> Run:
    """Wall time and own peak RSS; stdout to a file (a million events are 200 MB)."""
    sample = measure(argv, world.env, world.root, own_rss=True, out=out)
    checked(sample, " ".join(argv[-3:]))
    return Run(sample.seconds, sample.own_rss_kb or 0, sample.stderr, out)


def seed(db: Path) -> None:
    """100,000 tasks (a tenth closed), their attempts and a million events; one task has
    20,000 of them."""
    con = sqlite3.connect(db)
    base = time.time() - 365 * 86400
    statuses = ("done", "failed", "ready", "cancelled", "done")

    def stamp(offset: float) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(base + offset)) + ".000000"

    with con:
        con.executemany(
            "INSERT INTO tasks (id, title, prompt, repo, agent, base_ref, priority, status,"
            " closed_at, dispatch_failures, created_at, updated_at) VALUES"
            " (?, ?, ?, ?, 'shell', 'main', ?, ?, ?, 0, ?, ?)",
            (
                (i, f"task number {i}", f"do thing {i}", f"/srv/repo-{i % 20}", i % 5,
                 statuses[i % 5], stamp(i * 300 + 60) if i % 10 == 0 else None,
                 stamp(i * 300), stamp(i * 300 + 60))
                for i in range(1, SCALE_TASKS + 1)
            ),
        )  # fmt: skip
        con.executemany(
            "INSERT INTO attempts (id, task_id, number, state, outcome, exit_code,"
            " prior_status, host, resume, intent, started_at, ended_at) VALUES"
            " (?, ?, 1, 'ended', 'success', 0, 'ready', ?, 0, '{}', ?, ?)",
            ((i, i, f"host-{i % 3}", stamp(i * 300 + 1), stamp(i * 300 + 50))
             for i in range(1, SCALE_TASKS + 1) if statuses[i % 5] != "ready"),
        )  # fmt: skip
        rest = SCALE_EVENTS - SHOWN_TASK_EVENTS
        per_task = rest / (SCALE_TASKS - 1)

        def events() -> Iterator[tuple[object, ...]]:
            n = 0
            for i in range(1, SCALE_EVENTS + 1):
                if i <= rest:
                    task = 1 + int(n / per_task)
                    task = task + 1 if task >= SHOWN_TASK else task
                    n += 1
                else:
                    task = SHOWN_TASK
                detail = '{"exit_code": 0}' if i % 3 == 0 else "{}"
                yield (i, min(task, SCALE_TASKS), "note", "ready", "ready", stamp(i * 30), detail)

        con.executemany(
            "INSERT INTO events (id, task_id, kind, from_status, to_status, at, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            events(),
        )
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def _pairs(ours: list[str], raw: list[str], world: World, reps: int) -> tuple[list[Run], list[Run]]:
    """One discarded warm-up each, then alternating runs; the last outputs are kept."""
    a, b = world.root / "ours.out", world.root / "raw.out"
    _run(ours, world, a)
    _run(raw, world, b)
    mine: list[Run] = []
    theirs: list[Run] = []
    for _ in range(reps):
        mine.append(_run(ours, world, a))
        theirs.append(_run(raw, world, b))
    return mine, theirs


def _ms(runs: list[Run]) -> float:
    return statistics.median(r.seconds for r in runs) * 1000


def _mb(runs: list[Run]) -> float:
    return max(r.rss_kb for r in runs) / 1024


def bench(lab: Lab, mode: Mode) -> list[Figure]:
    reps = mode.reps["scale"]
    world = lab.world("scale")
    migrate(world)
    started = time.perf_counter()
    seed(world.db_path)
    seeded = time.perf_counter() - started
    db = str(world.db_path)
    dispatch = dispatch_argv()
    python = [sys.executable, "-c"]
    figures = []
    size = f"{SCALE_TASKS:,} tasks, {SCALE_EVENTS:,} events"

    # list, the table at its default limit.
    ours, theirs = _pairs([*dispatch, "list"], [*python, RAW_TABLE, db], world, reps)
    lines = ours[-1].out.read_text().splitlines()
    if len(lines) != 1 + TABLE_LIMIT or "more tasks match" not in ours[-1].stderr:
        raise BenchError(f"dispatch list printed {len(lines)} lines: {ours[-1].stderr}")
    value, base = _ms(ours), _ms(theirs)
    figures.append(Figure(
        f"list (table), {size}", ms(value), "raw sqlite3: the same 100 rows and the count",
        ms(base), f"{value / base:.1f}x", "<= 300 ms", value <= 300,
        [f"seeded in {seeded:.0f} s; peak RSS {_mb(ours):.1f} MB (raw {_mb(theirs):.1f} MB)"],
    ))  # fmt: skip

    # list --json, every open task.
    ours, theirs = _pairs([*dispatch, "list", "--json"], [*python, RAW_LIST, db], world, reps)
    got = json.loads(ours[-1].out.read_text())
    want = json.loads(theirs[-1].out.read_text())
    if [t["id"] for t in got] != [t["id"] for t in want]:
        raise BenchError(f"list --json printed {len(got)} tasks, raw {len(want)}")
    value, base = _ms(ours), _ms(theirs)
    figures.append(Figure(
        f"list --json, {len(got):,} open tasks", ms(value),
        "raw sqlite3 query + json.dumps, fresh python", ms(base), f"{value / base:.2f}x",
        "<= 1.5x", value <= 1.5 * base,
        [f"peak RSS {_mb(ours):.1f} MB (raw, all rows in memory: {_mb(theirs):.1f} MB)"],
    ))  # fmt: skip
    del got, want

    # events --json, the whole log.
    ours, theirs = _pairs([*dispatch, "events", "--json"], [*python, RAW_EVENTS, db], world, reps)
    count = _count_events(ours[-1].out)
    if count != SCALE_EVENTS:
        raise BenchError(f"events --json printed {count} events, not {SCALE_EVENTS}")
    value, base = _ms(ours), _ms(theirs)
    rate, peak = SCALE_EVENTS / (value / 1000), _mb(ours)
    figures.append(Figure(
        f"events --json, {SCALE_EVENTS:,} events", f"{rate:,.0f}/s, {peak:.0f} MB",
        "raw sqlite3 cursor + json.dumps per row", f"{SCALE_EVENTS / (base / 1000):,.0f}/s",
        f"{value / base:.2f}x", ">= 200,000/s, <= 80 MB", rate >= 200_000 and peak <= 80,
        [f"{ms(value)} (raw {ms(base)}, raw peak RSS {_mb(theirs):.1f} MB)"],
    ))  # fmt: skip

    # show of the task with 20,000 events.
    ours, theirs = _pairs(
        [*dispatch, "show", str(SHOWN_TASK), "--json"], [*python, RAW_SHOW, db], world, reps,
    )  # fmt: skip
    shown = json.loads(ours[-1].out.read_text())
    if len(shown["events"]) != SHOW_LIMIT or "earlier events" not in ours[-1].stderr:
        raise BenchError(f"show printed {len(shown['events'])} events")
    all_events = _run(
        [*dispatch, "show", str(SHOWN_TASK), "--json", "--events", "0"], world,
        world.root / "all.out",
    )  # fmt: skip
    value, base = _ms(ours), _ms(theirs)
    figures.append(Figure(
        f"show --json, a task with {SHOWN_TASK_EVENTS:,} events", ms(value),
        "raw sqlite3: the task, attempts, newest 50 events", ms(base),
        f"{value / base:.1f}x", "<= 200 ms", value <= 200,
        [f"all {SHOWN_TASK_EVENTS:,} events (--events 0): {all_events.seconds * 1000:,.0f} ms,"
         f" peak RSS {all_events.rss_kb / 1024:.1f} MB"],
    ))  # fmt: skip
    for name in ("ours.out", "raw.out", "all.out"):
        (world.root / name).unlink(missing_ok=True)
    return figures


def _count_events(path: Path) -> int:
    """Parse the array (it must be valid JSON) and count it."""
    with path.open("rb") as handle:
        return len(json.load(handle))
