"""Processes by pid: what /proc says about them, and stopping them (SIGINT, SIGTERM,
SIGKILL). The one place dispatch signals a process it did not start itself."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

# /proc start times are rounded to whole seconds of boot time: allow for that.
_START_SLACK = timedelta(seconds=2)


@dataclass(frozen=True)
class ProcStat:
    state: str  # "R", "S", "Z" (zombie), ...
    parent: int
    started: datetime


def proc_stat(pid: int) -> ProcStat | None:
    """The process's state, parent and start time; None if gone or where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime ")
        )
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        rest = stat[stat.rfind(")") + 2 :].split()
        state, parent, ticks = rest[0], int(rest[1]), int(rest[19])
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    started = datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"), tz=UTC)
    return ProcStat(state, parent, started)


def process_alive(pid: int | None, started_before: datetime | None) -> bool:
    """Whether `pid` still runs the process that existed at `started_before`.

    A zombie is dead, and a process that started later merely reuses the pid.
    """
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = proc_stat(pid)
    if stat is None:
        return True  # no /proc to ask: trust the pid
    if stat.state == "Z":
        return False
    return started_before is None or stat.started <= started_before + _START_SLACK


def attempt_processes(
    marker: Sequence[bytes],
    *,
    group: int | None = None,
    exclude: Iterable[int] = (),
    adopter: int | None = None,
) -> set[int]:
    """Live processes working for one attempt: those whose environment holds every entry
    of `marker` (the variables the wrapper gives its agent, which every descendant
    inherits, whatever process group or session it moves to), and every descendant of
    those and of `adopter` (the attempt's wrapper, which adopts what the agent orphans):
    a child started with an emptied environment (`env -i`) is the agent's all the same.

    By environment and descent rather than by process group: a recorded group id
    outlives its processes, and on a busy machine its number soon belongs to someone
    else's. Only where there is no /proc to read is the agent's `group` asked about."""
    skip = {os.getpid(), *exclude}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return {group} if group and _group_exists(group) else set()
    roots: set[int] = set() if adopter is None else {adopter}
    children: dict[int, list[int]] = {}
    for name in entries:
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            environ = b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:  # another user's process, or gone: not ours to judge
            continue
        state, parent = stat[stat.rfind(")") + 2 :].split(maxsplit=2)[:2]
        if state in ("Z", "X"):
            continue
        children.setdefault(int(parent), []).append(pid)
        if all(entry in environ for entry in marker):
            roots.add(pid)
    found, todo = set(roots), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    if adopter is not None:
        found.discard(adopter)
    return found - skip


def become_subreaper() -> bool:
    """Make this process the one that adopts its descendants' orphans (Linux), instead of
    init: what the agent starts and leaves behind stays among the wrapper's descendants,
    to be found and stopped. Whether it took."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes  # only here: the wrapper's one use of it

    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


_PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


def reap_adopted(keep: int) -> None:
    """Collect the exit of every orphan this process adopted that has ended (all of its
    children but `keep`, the agent, whose exit subprocess waits for)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for tid in tasks:
        try:
            listed = Path(f"/proc/self/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for pid in map(int, listed):
            if pid != keep:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)


def command_line(pid: int) -> list[str] | None:
    """A process's argv, None if it is gone (or there is no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").split("\0")[:-1]


def attempt_marker(attempt_id: int, database: str) -> tuple[bytes, bytes]:
    """What the wrapper puts in its agent's environment, as entries of /proc/PID/environ:
    the attempt id alone would match another database's attempt of the same number."""
    return (
        f"\0DISPATCH_ATTEMPT_ID={attempt_id}\0".encode(),
        f"\0DISPATCH_DB={database}\0".encode(),
    )


def _group_exists(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# How an attempt's processes are asked to stop, most polite first.
ESCALATION = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
# After SIGKILL nothing can refuse: this is only the kernel's time to tear them down.
_KILL_SETTLE_SECONDS = 2.0
_POLL_SECONDS = 0.1


def stop_processes(
    find: Callable[[], set[int]],
    *,
    grace: float,
    signals: Sequence[signal.Signals] = ESCALATION,
) -> set[int]:
    """Send each signal in turn to every process `find` returns, giving each `grace`
    seconds to work; return what still runs after the last (empty: all stopped)."""
    for signum in signals:
        pids = find()
        if not pids:
            return pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        wait = _KILL_SETTLE_SECONDS if signum == signal.SIGKILL else grace
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            time.sleep(_POLL_SECONDS)
            if not find():
                return set()
    return find()
