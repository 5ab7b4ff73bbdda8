"""The only place that prints: rich tables for people, JSON for scripts, one-line errors."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from dispatch.errors import ReaderGone

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
    from dispatch.store.pages import EventLine
    from dispatch.store.statements import AttemptRow, EventRow, TaskRow, TaskSummary


def _out(text: str, *, flush: bool = True) -> None:
    """Every write to stdout goes through here."""
    try:
        sys.stdout.write(text)
        if flush:
            sys.stdout.flush()
    except BrokenPipeError:
        raise ReaderGone from None


def emit_json(data: Any) -> None:
    _out(json.dumps(data, ensure_ascii=False, indent=None) + "\n")


def line(text: str) -> None:
    """A plain line on stdout (ids, paths: things scripts read)."""
    # Written as it is, not made visible: what is printed here is data (an id, a path, a
    # JSON line of `events --follow --json`) that a script must get byte for byte, as it
    # gets a title from --json; a path with a control character in it is still that path.
    _out(text + "\n")


def notice(text: str) -> None:
    """A message for the person, on stderr so stdout stays clean for scripts."""
    _stderr(_visible(text))


def _stderr(text: str) -> None:
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
    _stderr(_visible(text, _ONE_LINE))


def _console() -> Console:
    from rich.console import Console

    # rich honours NO_COLOR and drops styling when stdout is not a terminal. A pipe gets
    # whole lines rather than rich's 80 columns, so `dispatch list | grep` sees each row.
    wide = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    console = Console(
        highlight=False,
        emoji=False,  # a title such as ":rocket:" is shown as typed
        no_color="NO_COLOR" in os.environ,
        width=4096 if wide else None,
    )
    console.on_broken_pipe = _reader_gone  # type: ignore[method-assign]
    return console


def _reader_gone() -> None:
    """rich's own answer to a reader that went away is SystemExit(1)."""
    raise ReaderGone


# What a terminal would act on instead of showing, each shown as its code point the way
# Python writes it (ESC as \x1b): C0 controls and DEL (ESC starts colour, cursor and
# window-title sequences, CR and BS overwrite what is already on the line), C1 controls
# (U+009B is a one-character CSI to some terminals) and the bidirectional overrides and
# isolates, which reorder how the rest of the line reads. A backslash typed by the user
# stays as it is: text shown here is for reading, and --json gives it exactly. rich's
# `escape_control_codes` knows only BEL, BS, VT, FF and CR (not ESC, C1 or bidi), and
# its `Text` deletes those five without a trace.
_ESCAPES: dict[int, str] = {
    code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))
} | {code: f"\\u{code:04x}" for code in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
# Notices keep their line breaks; a table cell or an error is one line, a newline a space.
_TERMINAL = {**_ESCAPES, ord("\n"): "\n"}
_ONE_LINE = {**_ESCAPES, ord("\n"): " "}


def _visible(text: str, table: dict[int, str] = _TERMINAL) -> str:
    """`text` with every character a terminal would act on shown instead."""
    # None of the characters the table holds is printable, and `isprintable` is one pass
    # in C; `translate` looks every character up in the table, several times slower.
    return text if text.isprintable() else text.translate(table)


def _safe(text: str | None) -> str:
    """Table cells on one line, with markup and control characters shown as typed."""
    from rich.markup import escape

    return escape(_visible(text or "", _ONE_LINE))


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
    table = StreamedTable(TASK_HEADERS, status_column=1, shrinks=TITLE_COLUMN)
    for t in tasks:
        table.add(task_cells(t), task_style(t))
    table.flush()
    if not table.rows:
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
        for name in ("#", "ID", "STATE", "OUTCOME", "EXIT", "WINDOW", "STARTED", "ERROR"):
            table.add_column(name, overflow="fold")
        for a in attempts:
            table.add_row(
                str(a.number),
                str(a.id),
                _safe(a.state),
                _safe(a.outcome) or "-",
                "-" if a.exit_code is None else str(a.exit_code),
                _safe(a.tmux_target) or "-",
                _iso(a.started_at) or "-",
                _safe(a.error) or "-",
            )
        console.print(table)
    event_table(events, console=console)


def event_table(events: Sequence[EventRow], console: Console | None = None) -> None:
    if not events:
        notice("no events")
        return
    if console is not None:
        console.print("events")
    table = StreamedTable(EVENT_HEADERS)
    for e in events:
        table.add(event_cells(e))
    table.flush()


def more_line(more: int, what: str, option: str) -> None:
    """The last line of a limited listing: how many more matched, and how to see them."""
    if more > 0:
        notice(f"{more} {what}; `{option} 0` shows all")


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


# -- streamed output: memory flat however many rows ------------------------------------------

# ANSI colours of STATUS_STYLE, for rows printed without building a rich Table.
_SGR = {"cyan": "36", "yellow": "33", "green": "32", "red": "31", "magenta": "35", "dim": "2"}
# Rows a streamed table measures its columns on before it prints anything.
MEASURE_ROWS = 1000
# Lines written at a time.
_WRITE_LINES = 256


def _colour() -> bool:
    """What rich decides for a plain Console: colour on a terminal, unless NO_COLOR or dumb."""
    term = os.environ.get("TERM", "")
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and term not in ("dumb", "unknown")


def _cell(text: str | None) -> str:
    # `_visible` inlined: a streamed table calls this for every cell of a million rows.
    text = text or ""
    return text if text.isprintable() else text.translate(_ONE_LINE)


def _cell_width(text: str) -> int:
    """The terminal cells `text` takes (a CJK character or an emoji takes two)."""
    # ASCII is one cell a character once controls are escaped, and `isascii` reads a flag.
    if text.isascii():
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


# A column that shrinks to fit the terminal keeps at least this many cells, and leaves
# the last column (unpadded, so it may run on) at least this many.
_NARROWEST, _LAST_ROOM = 12, 20


def _cut(text: str, width: int) -> str:
    """`text` cut to `width` terminal cells, the last of them an ellipsis."""
    if text.isascii():
        return text[: width - 1] + "…"
    from rich.cells import set_cell_size

    return set_cell_size(text, width - 1) + "…"


class StreamedTable:
    """A table printed as its rows arrive, in columns measured on the first rows.

    A rich `Table` holds every row and measures them all before printing: 100,000 rows
    take half a minute and half a gigabyte. Here the columns are as wide as the first
    `MEASURE_ROWS` rows need; a longer cell later only pushes its own row wider. Rows
    added after `flush` (`events --follow`) come after the table was seen: one that does
    not fit widens the columns and the header is printed again above it, so every row
    lines up with the header above it. Widths are terminal cells (a CJK character or an
    emoji takes two), as rich measures them. On a terminal, the `shrinks` column gives
    way so that the others fit its width: its longer cells are cut, ending in "…" (a
    pipe gets them whole).
    """

    def __init__(
        self,
        headers: Sequence[str],
        *,
        status_column: int | None = None,
        shrinks: int | None = None,
    ) -> None:
        self._headers = list(headers)
        self._status = status_column
        self._colour = _colour()
        self._shrinks = shrinks if shrinks is not None and sys.stdout.isatty() else None
        self._widths: list[int] | None = None
        self._pending: list[tuple[list[str], str | None]] = []
        self._lines: list[str] = []
        self._flushed = False
        self.rows = 0

    def add(self, cells: list[str], style: str | None = None) -> None:
        self.rows += 1
        if self._widths is None:
            self._pending.append((cells, style))
            if len(self._pending) >= MEASURE_ROWS:
                self._measure()
            return
        if self._flushed and not self._fits(cells):
            self._widen(cells)
            self._header()
        self._emit(cells, style)

    def _measure(self) -> None:
        widths = [_cell_width(h) for h in self._headers]
        for cells, _ in self._pending:
            for i, cell in enumerate(cells):
                widths[i] = max(widths[i], _cell_width(cell))
        if self._shrinks is not None:
            widths[self._shrinks] = self._room(widths, self._shrinks)
        self._widths = widths
        self._header()
        pending, self._pending = self._pending, []
        for cells, style in pending:
            self._emit(cells, style)

    def _room(self, widths: list[int], column: int) -> int:
        """How wide `column` may be for a row to fit the terminal; never narrower than its
        header or than _NARROWEST, and it leaves the last column _LAST_ROOM cells."""
        import shutil

        others = sum(w for i, w in enumerate(widths[:-1]) if i != column)
        room = shutil.get_terminal_size().columns - others - 2 * (len(widths) - 1)
        room -= min(widths[-1], _LAST_ROOM)
        floor = max(_cell_width(self._headers[column]), _NARROWEST)
        return max(min(widths[column], room), floor)

    def _fits(self, cells: list[str]) -> bool:
        assert self._widths is not None
        # The last column is never padded: however long its cell, the others stay put;
        # nor is a cell of the column that shrinks, which is cut instead.
        return all(
            _cell_width(c) <= w or i == self._shrinks
            for i, (c, w) in enumerate(zip(cells[:-1], self._widths, strict=False))
        )

    def _widen(self, cells: list[str]) -> None:
        assert self._widths is not None
        self._widths = [
            w if i == self._shrinks else max(w, _cell_width(c))
            for i, (w, c) in enumerate(zip(self._widths, cells, strict=True))
        ]

    def _header(self) -> None:
        header = self._format(self._headers, None)
        self._lines.append(f"\x1b[1m{header}\x1b[0m" if self._colour else header)

    def _format(self, cells: list[str], style: str | None) -> str:
        assert self._widths is not None
        last = len(cells) - 1
        parts = []
        for i, cell in enumerate(cells):
            if i == self._shrinks and _cell_width(cell) > self._widths[i]:
                cell = _cut(cell, self._widths[i])
            if i == last:
                padded = cell
            elif cell.isascii():
                padded = cell.ljust(self._widths[i])
            else:
                padded = cell + " " * (self._widths[i] - _cell_width(cell))
            if style and i == self._status and self._colour and style in _SGR:
                padded = f"\x1b[{_SGR[style]}m{cell}\x1b[0m" + padded[len(cell) :]
            parts.append(padded)
        return "  ".join(parts).rstrip()

    def _emit(self, cells: list[str], style: str | None) -> None:
        self._lines.append(self._format(cells, style))
        if len(self._lines) >= _WRITE_LINES:
            self._write()

    def _write(self) -> None:
        lines, self._lines = self._lines, []
        _out("\n".join(lines) + "\n" if lines else "")

    def flush(self) -> None:
        """Print every row added so far; a later row that does not fit repeats the header."""
        if self._widths is None and self._pending:
            self._measure()
        self._write()
        self._flushed = self._widths is not None


class JsonArray:
    """A JSON array written a chunk at a time: the same text `emit_json` gives a list.

    Objects are encoded a chunk at a time, in one call of the C encoder each (about
    twice as fast as one call per object); text already encoded is taken as it is.
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._objects: list[Any] = []
        self._started = False

    def extend(self, texts: Sequence[str]) -> None:
        """Elements already encoded, many at once."""
        if self._objects:
            self._encode()  # in the order given
        self._parts.extend(texts)
        if len(self._parts) >= _WRITE_LINES:
            self._write()

    def add_object(self, data: Any) -> None:
        self._objects.append(data)
        if len(self._objects) >= _ENCODE_OBJECTS:
            self._encode()

    def _encode(self) -> None:
        if self._objects:
            self._parts.append(json.dumps(self._objects, ensure_ascii=False)[1:-1])
            self._objects = []
        self._write()

    def _write(self) -> None:
        if not self._parts:
            return
        lead = ", " if self._started else "["
        _out(lead + ", ".join(self._parts), flush=False)
        self._started = True
        self._parts = []

    def close(self) -> None:
        self._encode()
        _out("]\n" if self._started else "[]\n")


# Objects a streamed JSON array encodes at once.
_ENCODE_OBJECTS = 1000


def json_text(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


TASK_HEADERS = ("ID", "STATUS", "PRI", "AGENT", "HOST", "TITLE", "LAST ERROR")
TITLE_COLUMN = TASK_HEADERS.index("TITLE")


def task_cells(t: TaskSummary) -> list[str]:
    status = t.status + (" (closed)" if t.closed_at is not None else "")
    return [
        str(t.id),
        _cell(status),
        str(t.priority),
        _cell(t.agent),
        _cell(t.host) or "-",
        _cell(t.title),
        _cell(t.last_error),
    ]


def task_style(t: TaskSummary) -> str | None:
    return STATUS_STYLE.get(t.status)


_JSON_WORDS: dict[str | None, str] = {None: "null"}


def _word(text: str | None) -> str:
    """A short repeated string (a kind, a status) as JSON, encoded once."""
    found = _JSON_WORDS.get(text)
    if found is None:
        found = _JSON_WORDS[text] = json.dumps(text, ensure_ascii=False)
    return found


def event_json_lines(events: Sequence[EventLine]) -> list[str]:
    """Each event as `event_json` shapes it, as JSON text; the stored detail is JSON
    already. A batch per call: `events --json` prints a million of them."""
    word = _JSON_WORDS.get
    return [
        f'{{"id": {e.id}, "task_id": {"null" if e.task_id is None else e.task_id}, '
        f'"attempt_id": {"null" if e.attempt_id is None else e.attempt_id}, '
        f'"kind": {word(e.kind) or _word(e.kind)}, '
        f'"from_status": {word(e.from_status) or _word(e.from_status)}, '
        f'"to_status": {word(e.to_status) or _word(e.to_status)}, "at": "{e.at}", '
        f'"detail": {e.detail if isinstance(e.detail, str) else json_text(e.detail)}}}'
        for e in events
    ]


EVENT_HEADERS = ("ID", "AT", "TASK", "ATTEMPT", "KIND", "FROM", "TO", "DETAIL")


def event_cells(e: EventLine | EventRow) -> list[str]:
    detail = json.loads(e.detail) if isinstance(e.detail, str) else e.detail
    text = ", ".join(f"{k}={v}" for k, v in detail.items()) if isinstance(detail, dict) else ""
    return [
        str(e.id),
        _iso(e.at) or "",
        str(e.task_id or "-"),
        str(e.attempt_id or "-"),
        _cell(e.kind),
        e.from_status or "-",
        e.to_status or "-",
        _cell(text),
    ]
