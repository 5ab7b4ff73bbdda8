"""Recognising a recorded pid (alive, a zombie, or a newer process that reuses the number),
and an attempt's processes by their marker and their descent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dispatch.adapters.processes import (
    attempt_processes,
    become_subreaper,
    command_line,
    proc_stat,
    process_alive,
)


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


def test_a_marked_processs_unmarked_descendants_are_the_attempts() -> None:
    marker = (f"\0DISPATCH_ATTEMPT_ID={os.getpid()}\0".encode(), b"\0DISPATCH_DB=unit\0")
    env = {**os.environ, "DISPATCH_ATTEMPT_ID": str(os.getpid()), "DISPATCH_DB": "unit"}
    # The marked shell starts a child with an emptied environment.
    agent = subprocess.Popen(
        ["sh", "-c", "env -i /bin/sleep 30 & wait"], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 5
        while len(attempt_processes(marker)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        found = attempt_processes(marker)
        [child] = found - {agent.pid}
        assert agent.pid in found
        assert b"DISPATCH_ATTEMPT_ID" not in Path(f"/proc/{child}/environ").read_bytes()
        assert attempt_processes(marker, exclude=[agent.pid]) == {child}
    finally:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
    assert attempt_processes(marker) == set()


# Run in a process of its own: it collects the exits of that process's children.
_REAP = """
import os, subprocess, sys, time
from dispatch.adapters.processes import proc_stat, reap_adopted
keep, other = subprocess.Popen(["true"]), subprocess.Popen(["true"])
deadline = time.monotonic() + 5
while any(getattr(proc_stat(p.pid), "state", "Z") != "Z" for p in (keep, other)):
    assert time.monotonic() < deadline
    time.sleep(0.01)
reap_adopted(keep=keep.pid)
assert proc_stat(other.pid) is None, "the other child's exit was collected"
assert proc_stat(keep.pid).state == "Z", "the kept child's exit is left for its waiter"
assert keep.wait() == 0
"""


def test_collecting_adopted_exits_leaves_the_agents_own_for_its_waiter() -> None:
    done = subprocess.run([sys.executable, "-c", _REAP], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_no_subreaper_outside_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert become_subreaper() is False


def test_the_command_line_of_a_process_that_is_gone_is_none() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        # Until its exec is done, the child shows its parent's command line, or none.
        deadline = time.monotonic() + 10
        while (command_line(child.pid) or [])[:2] != ["sleep", "30"]:
            assert time.monotonic() < deadline, command_line(child.pid)
            time.sleep(0.01)
    finally:
        child.kill()
        child.wait()
    assert command_line(child.pid) is None
