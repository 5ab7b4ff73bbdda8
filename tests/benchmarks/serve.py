"""The monitor (`dispatch serve`): `GET /api/tasks` over 10,000 tasks, from a CLI change
to its frame on an open event stream, and the server's idle CPU with that stream open."""

from __future__ import annotations

import http.client
import json
import os
import sqlite3
import subprocess
import time
from datetime import datetime
from pathlib import Path

from tests.benchmarks import seed
from tests.benchmarks.harness import (
    BenchError,
    Figure,
    Lab,
    Mode,
    World,
    checked,
    dispatch_argv,
    make_repo,
    median_ms,
    migrate,
    ms,
)
from tests.benchmarks.listing import LIST_QUERY

SERVE_TASKS = 10_000
IDLE_SECONDS = 10.0


def _start_server(world: World) -> tuple[subprocess.Popen[str], int, str]:
    proc = subprocess.Popen(
        [*dispatch_argv(), "serve", "--port", "0", "--sweep-every", "0"],
        env=world.env, cwd=world.root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if "#token=" not in line:
        proc.kill()
        raise BenchError(f"dispatch serve printed {line!r}")
    address, token = line.split("/#token=")
    return proc, int(address.rsplit(":", 1)[1]), token


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bench(lab: Lab, mode: Mode) -> list[Figure]:
    reps = mode.reps["serve"]
    world = lab.world("serve")
    repo = make_repo(world.root / "repo", world.env, 1)
    migrate(world)
    task_ids = seed.tasks(world.url, SERVE_TASKS, repo=str(repo))
    seed.ended_attempts(world.url, task_ids)
    proc, port, token = _start_server(world)
    auth = {"Authorization": f"Bearer {token}"}
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

        def get_tasks() -> float:
            start = time.perf_counter()
            conn.request("GET", "/api/tasks", headers=auth)
            response = conn.getresponse()
            body = response.read()
            took = time.perf_counter() - start
            if response.status != 200 or len(json.loads(body)) != SERVE_TASKS:
                raise BenchError(f"GET /api/tasks answered {response.status}")
            return took

        def change_one(n: int) -> None:
            """What a page load usually follows: one task written by another process."""
            con = sqlite3.connect(world.db_path)
            with con:
                con.execute("UPDATE tasks SET last_error = ? WHERE id = 1", (f"change {n}",))
            con.close()

        get_tasks()  # warm: imports, page cache
        listed = []
        for n in range(reps):
            change_one(n)
            listed.append(get_tasks())
        # With nothing written since the last answer, the server answers it again.
        unchanged = [get_tasks() for _ in range(reps)]
        raw: list[float] = []
        for _ in range(reps):
            start = time.perf_counter()
            con = sqlite3.connect(world.db_path)
            con.row_factory = sqlite3.Row
            json.dumps([dict(r) for r in con.execute(LIST_QUERY)])
            con.close()
            raw.append(time.perf_counter() - start)

        # One page open: its stream, then CLI changes and when their frames arrive.
        stream = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        stream.request("GET", "/api/events", headers=auth)
        feed = stream.getresponse()
        feed.readline()  # ": connected"
        feed.readline()
        latencies: list[float] = []
        for i in range(reps):
            checked(world.dispatch("add", f"live {i}", "--repo", str(repo)), "add")
            while True:
                line = feed.readline().decode()
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    at = datetime.fromisoformat(event["at"].replace("Z", "+00:00"))
                    latencies.append((datetime.now(at.tzinfo) - at).total_seconds())
                    break

        before = _cpu_seconds(proc.pid)
        time.sleep(IDLE_SECONDS)
        idle = (_cpu_seconds(proc.pid) - before) / IDLE_SECONDS * 100
        stream.close()
        conn.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
    if proc.returncode != 0:
        raise BenchError(f"dispatch serve exited {proc.returncode} on SIGTERM")
    value, base = median_ms(listed), median_ms(raw)
    latency = median_ms(latencies)
    return [
        Figure(
            f"GET /api/tasks, {SERVE_TASKS:,} tasks, one changed",
            ms(value),
            "raw sqlite3 query + json, in process",
            ms(base),
            f"{value / base:.1f}x",
            "<= 150 ms",
            value <= 150,
            [
                "each request after one task was written by another process; with nothing "
                f"written since the last answer: {ms(median_ms(unchanged))}"
            ],
        ),
        Figure(
            "CLI change -> SSE frame",
            ms(latency),
            "the watcher's poll interval",
            ms(500),
            f"{latency / 500:.1f}x",
            "<= 1 s",
            latency <= 1000,
            [f"max {ms(max(latencies) * 1000)}"],
        ),
        Figure(
            f"idle CPU, one stream, {IDLE_SECONDS:.0f} s",
            f"{idle:.2f} %",
            "-",
            "-",
            "-",
            "<= 1 %",
            idle <= 1.0,
        ),
    ]
