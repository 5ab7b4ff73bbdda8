"""Recognising a recorded pid: alive, a zombie, or a newer process that reuses the number."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import UTC, datetime, timedelta

from dispatch.adapters.processes import proc_stat, process_alive


def test_proc_stat_names_the_parent_and_a_start_time_in_the_past() -> None:
    stat = proc_stat(os.getpid())
    assert stat is not None
    assert stat.parent == os.getppid()
    assert stat.state in {"R", "S"}
    assert stat.started <= datetime.now(UTC)


def test_a_zombie_and_a_reaped_process_are_dead() -> None:
    child = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while getattr(proc_stat(child.pid), "state", "Z") != "Z" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not process_alive(child.pid, None)  # exited, not yet waited for: a zombie
    child.wait()
    assert proc_stat(child.pid) is None
    assert not process_alive(child.pid, None)


def test_a_process_started_after_the_moment_is_not_the_one_recorded() -> None:
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert process_alive(child.pid, datetime.now(UTC))
        # Recorded an hour ago: this pid now belongs to a newer process.
        assert not process_alive(child.pid, datetime.now(UTC) - timedelta(hours=1))
    finally:
        child.kill()
        child.wait()
