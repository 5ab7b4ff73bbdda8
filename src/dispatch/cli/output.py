"""The only place that prints: rich tables for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

# The shapes are shared with the monitor; the CLI modules keep using them from here.
from dispatch.shapes import attempt_json as attempt_json
from dispatch.shapes import event_json as event_json
from dispatch.shapes import iso as _iso
from dispatch.shapes import task_json as task_json

if TYPE_CHECKING:
    from rich.console import Console

    from dispatch.errors import DispatchError
    from dispatch.services.gc import GcReport
    from dispatch.services.restore import Restored
    from dispatch.store.statements import AttemptRow, EventRow, TaskRow, TaskSummary


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=None) + "\n")
    sys.stdout.flush()


def line(text: str) -> None:
    """A plain line on stdout (ids, paths: things scripts read)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def notice(text: str) -> None:
    """A message for the person, on stderr so stdout stays clean for scripts."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def error(exc: DispatchError, *, json: bool = False) -> None:
    """One error: a line on stderr, or with --json the error object on stdout."""
    if json:
        emit_json({"error": {"code": exc.exit_code, "kind": exc.kind, "message": exc.message}})
        return
    text = f"dispatch: error: {exc.message}"
    if exc.hint:
        text += f" (hint: {exc.hint})"
    notice(text.replace("\n", " "))


def _console() -> Console:
    from rich.console import Console

    # rich honours NO_COLOR and drops styling when stdout is not a terminal. A pipe gets
    # whole lines rather than rich's 80 columns, so `dispatch list | grep` sees each row.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    return Console(
        highlight=False,
        emoji=False,  # a title such as ":rocket:" is shown as typed
        no_color="NO_COLOR" in os.environ,
        width=4096 if wide else None,
    )


def _safe(text: str | None) -> str:
    """Table cells on one line, with markup shown as typed."""
    from rich.markup import escape

    return escape((text or "").replace("\n", " ").replace("\r", " "))


# Colour only where it carries meaning; rich drops it for pipes, dumb terminals and NO_COLOR.
STATUS_STYLE = {
    "ready": "cyan",
    "in-progress": "yellow",
    "done": "green",
    "failed": "red",
    "incomplete": "magenta",
    "interrupted": "red",
    "cancelled": "dim",
}


def _status(status: str, closed: bool = False) -> str:
    text = f"[{STATUS_STYLE[status]}]{status}[/]" if status in STATUS_STYLE else _safe(status)
    return text + (" (closed)" if closed else "")


def task_table(tasks: Iterable[TaskSummary]) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for name in ("ID", "STATUS", "PRI", "AGENT", "HOST", "TITLE", "LAST ERROR"):
        table.add_column(name, overflow="fold")
    rows = 0
    for t in tasks:
        table.add_row(
            str(t.id),
            _status(t.status, t.closed_at is not None),
            str(t.priority),
            _safe(t.agent),
            _safe(t.host) or "-",
            _safe(t.title),
            _safe(t.last_error),
        )
        rows += 1
    if rows:
        _console().print(table)
    else:
        notice("no tasks")


def task_detail(t: TaskRow, attempts: Sequence[AttemptRow], events: Sequence[EventRow]) -> None:
    from rich.table import Table

    console = _console()
    closed = f" (closed {_iso(t.closed_at)})" if t.closed_at else ""
    console.print(f"task {t.id}: {_safe(t.title)}")
    console.print(f"  {'status':<11}{_status(t.status)}{_safe(closed)}")
    for label, value in (
        ("repo", t.repo),
        ("agent", t.agent),
        ("base", t.base_ref),
        ("priority", str(t.priority)),
        ("branch", t.branch or "-"),
        ("worktree", t.worktree or "-"),
        ("last error", t.last_error or "-"),
    ):
        console.print(f"  {label:<11}{_safe(value)}")
    if attempts:
        table = Table(title="attempts", box=None, title_justify="left")
        columns = ("#", "ID", "STATE", "OUTCOME", "EXIT", "HOST", "WINDOW", "STARTED", "ERROR")
        for name in columns:
            table.add_column(name, overflow="fold")
        for a in attempts:
            table.add_row(
                str(a.number),
                str(a.id),
                a.state,
                a.outcome or "-",
                "-" if a.exit_code is None else str(a.exit_code),
                _safe(a.host),
                a.tmux_target or "-",
                _iso(a.started_at) or "-",
                _safe(a.error) or "-",
            )
        console.print(table)
    event_table(events, console=console)


def event_table(events: Sequence[EventRow], console: Console | None = None) -> None:
    from rich.table import Table

    if not events:
        notice("no events")
        return
    table = Table(title="events", box=None, title_justify="left")
    for name in ("ID", "AT", "TASK", "ATTEMPT", "KIND", "FROM", "TO", "DETAIL"):
        table.add_column(name, overflow="fold")
    for e in events:
        detail = ", ".join(f"{k}={v}" for k, v in e.detail.items())
        table.add_row(
            str(e.id),
            _iso(e.at) or "",
            str(e.task_id or "-"),
            str(e.attempt_id or "-"),
            e.kind,
            e.from_status or "-",
            e.to_status or "-",
            _safe(detail),
        )
    (console or _console()).print(table)


def key_values(title: str, rows: Sequence[tuple[str, str, bool]]) -> None:
    """A check list (`doctor`): name, detail, passed."""
    console = _console()
    console.print(title)
    for name, detail, ok in rows:
        mark = "ok  " if ok else "FAIL"
        console.print(f"  {mark} {_safe(name):<12} {_safe(detail)}")


@contextmanager
def progress(total: int, label: str, *, quiet: bool = False) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr (for people only: hidden with --json or off a terminal)."""
    if quiet or total == 0 or not sys.stderr.isatty():
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def bulk_summary(rows: Sequence[tuple[int, str, str]]) -> None:
    """One row a task: what a bulk command did to it."""
    from rich.table import Table

    if not rows:
        notice("nothing to do")
        return
    table = Table(box=None, pad_edge=False)
    for name in ("TASK", "STATUS", "DETAIL"):
        table.add_column(name, overflow="fold")
    for task_id, status, detail in rows:
        table.add_row(str(task_id), _status(status), _safe(detail))
    _console().print(table)


def gc_json(report: GcReport) -> dict[str, Any]:
    return {
        "removed": [
            {"task_id": r.task_id, "worktree": r.worktree, "snapshot": r.snapshot, "bytes": r.bytes}
            for r in report.removed
        ],
        "kept": [{"task_id": k.task_id, "reason": k.reason} for k in report.kept],
        "freed_bytes": report.freed_bytes,
    }


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def gc_table(report: GcReport) -> None:
    """What gc removed (or would) and what it kept, with why."""
    from rich.table import Table

    verb = "would remove" if report.dry_run else "removed"
    if report.removed or report.kept:
        table = Table(box=None, pad_edge=False)
        for name in ("TASK", "ACTION", "WORKTREE", "SNAPSHOT", "SIZE"):
            table.add_column(name, overflow="fold")
        for r in report.removed:
            task = "orphan" if r.task_id is None else str(r.task_id)
            table.add_row(task, verb, _safe(r.worktree), _safe(r.snapshot) or "-", _size(r.bytes))
        for k in report.kept:
            task = "orphan" if k.task_id is None else str(k.task_id)
            table.add_row(task, "kept", _safe(k.reason), "", "")
        _console().print(table)
    for branch in report.branches:
        notice(f"{'would delete' if report.dry_run else 'deleted'} merged branch {branch}")
    freed = "would free" if report.dry_run else "freed"
    notice(
        f"{verb} {len(report.removed)} worktree(s), kept {len(report.kept)}; "
        f"{freed} {_size(report.freed_bytes)}"
    )


def restored_json(r: Restored) -> dict[str, Any]:
    return {
        "task_id": r.task_id,
        "worktree": r.worktree,
        "branch": r.branch,
        "snapshot": r.snapshot,
        "restored": r.restored,
    }


def restored_line(r: Restored) -> None:
    if not r.restored:
        notice(f"task {r.task_id}: worktree {r.worktree} is already there; nothing to do")
        return
    applied = f", uncommitted work from {r.snapshot}" if r.snapshot else ""
    notice(f"task {r.task_id}: restored worktree {r.worktree} on {r.branch}{applied}")
