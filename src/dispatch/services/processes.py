"""What /proc says about a process: whether a recorded pid is still the process it was."""

from __future__ import annotations

import os
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
