"""`dispatch list --json` over 10,000 tasks, beside a fresh python reading the same rows
with sqlite3 and printing them as JSON."""

from __future__ import annotations

import json
import sys

from tests.benchmarks import seed
from tests.benchmarks.harness import (
    BenchError,
    Figure,
    Lab,
    Mode,
    Sample,
    checked,
    cpu_note,
    dispatch_argv,
    measure,
    median_ms,
    migrate,
    ms,
)

LIST_TASKS = 10_000

# The rows `dispatch list --json` prints, in its order (the monitor's task list reads them too).
LIST_QUERY = (
    "SELECT id, title, status, repo, agent, base_ref, priority, closed_at, last_error,"
    " created_at, updated_at, branch, worktree FROM tasks WHERE closed_at IS NULL"
    " ORDER BY priority DESC, id"
)
# A fresh process reading them with nothing but sqlite3.
RAW_LIST = f"""\
import json, sqlite3, sys
con = sqlite3.connect(sys.argv[1])
con.row_factory = sqlite3.Row
rows = con.execute(
    "{LIST_QUERY}"
).fetchall()
sys.stdout.write(json.dumps([dict(r) for r in rows]) + "\\n")
"""


def bench(lab: Lab, mode: Mode) -> list[Figure]:
    world = lab.world("list")
    migrate(world)
    seed.tasks(world.url, LIST_TASKS, repo=str(world.root / "repo"))
    dispatch = [*dispatch_argv(), "list", "--json"]
    raw = [sys.executable, "-c", RAW_LIST, str(world.db_path)]
    first = checked(measure(dispatch, world.env, world.root), "dispatch list --json")
    listed = json.loads(first.stdout)
    if len(listed) != LIST_TASKS:
        raise BenchError(f"dispatch list --json printed {len(listed)} tasks, not {LIST_TASKS}")
    raw_rows = json.loads(checked(measure(raw, world.env, world.root), "raw list").stdout)
    if len(raw_rows) != LIST_TASKS:
        raise BenchError(f"the raw query returned {len(raw_rows)} rows, not {LIST_TASKS}")
    ours: list[Sample] = []
    theirs: list[float] = []
    for _ in range(mode.reps["list"]):
        ours.append(checked(measure(dispatch, world.env, world.root), "dispatch list"))
        theirs.append(checked(measure(raw, world.env, world.root), "raw list").seconds)
    value, base = median_ms([x.seconds for x in ours]), median_ms(theirs)
    return [
        Figure(
            f"list --json, {LIST_TASKS:,} tasks",
            ms(value),
            "raw sqlite3 query, fresh python",
            ms(base),
            f"{value / base:.1f}x",
            "<= 400 ms",
            value <= 400,
            [cpu_note(ours)],
        )
    ]
