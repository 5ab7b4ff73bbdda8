"""What reaches a terminal: user text never as control sequences, columns in line in
terminal cells, and `--json` exactly as stored (SPEC §5)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest
from sqlalchemy.orm import Session

from dispatch.app import App
from dispatch.cli import output as out
from dispatch.store.models import Task
from tests.cli.inprocess import InProcess
from tests.conftest import Env, Result
from tests.faults import wait_for
from tests.orm import ended_attempt, orm_write

Cli = Callable[..., Result]

# A window-title (OSC) sequence ended by BEL, colour codes, a carriage return that would
# overwrite the line, DEL, a tab, a one-character CSI (C1), and bidirectional overrides.
EVIL = "evil\x1b]0;PWNED\x07 \x1b[31mred\x1b[0m\rX\x7f\tT\x9b2J\u202eRLO\u2066LRI\u2069"
# What the terminal must be shown instead, letter for letter.
SHOWN = r"evil\x1b]0;PWNED\x07 \x1b[31mred\x1b[0m\x0dX\x7f\x09T\x9b2J\u202eRLO\u2066LRI\u2069"
RAW = {
    *map(chr, range(0x20)),
    "\x7f",
    *map(chr, range(0x80, 0xA0)),
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
} - {"\n"}


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, env: Env) -> Cli:
    return InProcess(capsys, monkeypatch, env)


def _add(cli: Cli, repo: Path, title: str) -> int:
    done = cli("add", title, "--agent", "shell", cwd=repo)
    assert done.code == 0, done.stderr
    return int(done.stdout)


def _raw_in(text: str) -> set[str]:
    """The characters a terminal would act on, found in `text` (newlines aside)."""
    return set(text) & RAW


def _set_task(make_app: Callable[..., App], task_id: int, **columns: str) -> None:
    def work(s: Session) -> None:
        task = s.get(Task, task_id)
        assert task is not None
        for name, value in columns.items():
            setattr(task, name, value)

    orm_write(make_app().db, work)


def _hostile_attempt_and_event(make_app: Callable[..., App], task_id: int) -> None:
    """An attempt whose error and window are EVIL, and an event whose detail is."""
    ended_attempt(
        make_app().db, task_id, tmux_target=f"dispatch:{EVIL}", error=EVIL, detail={"why": EVIL}
    )


# -- columns in terminal cells, as an independent witness ------------------------------------


def _cells(text: str) -> list[str]:
    """`text` one terminal cell an entry: a wide character fills two (the second empty),
    a combining mark shares its base's."""
    cells: list[str] = []
    for char in text:
        if unicodedata.combining(char) and cells:
            cells[-1] += char
            continue
        cells.append(char)
        if unicodedata.east_asian_width(char) in ("W", "F"):
            cells.append("")
    return cells


def _starts(header: str) -> dict[str, int]:
    """Each column's first cell in a header line (names such as LAST ERROR hold a space)."""
    return {m.group(): m.start() for m in re.finditer(r"\S+(?: \S+)*", header)}


def _assert_in_line(header: str, row: str, values: dict[str, str]) -> None:
    """Each value starts its row at its column's cell in the header, after the gap."""
    starts, cells = _starts(header), _cells(row)
    for name, value in values.items():
        at = starts[name]
        assert "".join(cells[at:]).startswith(value), (name, header, row)
        assert at == 0 or cells[at - 2 : at] == [" ", " "], (name, header, row)


# -- control characters ------------------------------------------------------------------------


def test_list_shows_control_characters_in_a_title_instead_of_sending_them(
    cli: Cli, repo: Path, make_app: Callable[..., App]
) -> None:
    task_id = _add(cli, repo, EVIL)
    _set_task(make_app, task_id, last_error=f"boom {EVIL}")
    done = cli("list")
    assert done.code == 0, done.stderr
    assert not _raw_in(done.stdout + done.stderr), done.stdout
    header, row = done.stdout.splitlines()
    assert row.endswith(f"{SHOWN}  boom {SHOWN}")
    _assert_in_line(header, row, {"ID": "1", "TITLE": SHOWN, "LAST ERROR": f"boom {SHOWN}"})


def test_show_shows_control_characters_in_its_header_rows_and_tables(
    cli: Cli, repo: Path, make_app: Callable[..., App]
) -> None:
    task_id = _add(cli, repo, EVIL)
    _set_task(make_app, task_id, last_error=EVIL, branch=EVIL, worktree=f"/w/{EVIL}")
    _hostile_attempt_and_event(make_app, task_id)
    done = cli("show", str(task_id))
    assert done.code == 0, done.stderr
    assert not _raw_in(done.stdout + done.stderr), done.stdout
    lines = done.stdout.splitlines()
    assert lines[0] == f"task {task_id}: {SHOWN}"
    assert f"  branch     {SHOWN}" in lines
    assert f"  worktree   /w/{SHOWN}" in lines
    assert f"  last error {SHOWN}" in lines
    assert any(line.rstrip().endswith(SHOWN) and "failed" in line for line in lines)  # ERROR
    assert any(f"dispatch:{SHOWN}" in line for line in lines)  # WINDOW
    assert any(line.endswith(f"why={SHOWN}") for line in lines)  # the event's DETAIL


def test_events_show_control_characters_in_a_detail(
    cli: Cli, repo: Path, make_app: Callable[..., App]
) -> None:
    task_id = _add(cli, repo, "plain")
    _hostile_attempt_and_event(make_app, task_id)
    done = cli("events")
    assert done.code == 0, done.stderr
    assert not _raw_in(done.stdout + done.stderr), done.stdout
    header, _, finished = done.stdout.splitlines()  # created, finished
    _assert_in_line(header, finished, {"KIND": "finished", "DETAIL": f"why={SHOWN}"})


def test_json_keeps_the_exact_text(cli: Cli, repo: Path, make_app: Callable[..., App]) -> None:
    task_id = _add(cli, repo, EVIL)
    _hostile_attempt_and_event(make_app, task_id)
    assert [t["title"] for t in cli("list", "--json").json()] == [EVIL]
    shown = cli("show", str(task_id), "--json").json()
    assert shown["title"] == EVIL and shown["attempts"][0]["error"] == EVIL
    assert cli("events", "--json").json()[-1]["detail"] == {"why": EVIL}
    added = cli("add", EVIL, "--json", cwd=repo)
    assert added.json()["title"] == EVIL


def test_an_error_line_quoting_user_text_shows_its_control_characters(
    cli: Cli, repo: Path, env: Env
) -> None:
    done = cli("add", "t", "--repo", str(env.root / EVIL))
    assert done.code == 7  # not a repository: the environment, not the usage
    assert done.stdout == ""
    assert not _raw_in(done.stderr), done.stderr
    assert done.stderr.count("\n") == 1
    assert f"dispatch: error: {env.root}/{SHOWN} does not exist" in done.stderr
    as_json = cli("add", "t", "--repo", str(env.root / EVIL), "--json")
    assert str(env.root / EVIL) in as_json.json()["error"]["message"]


def test_notices_keep_their_lines_and_plain_lines_stay_exact(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out.notice(f"first {EVIL}\nsecond")
    out.line(f"/path/{EVIL}")
    captured = capsys.readouterr()
    assert captured.err == f"first {SHOWN}\nsecond\n"
    assert captured.out == f"/path/{EVIL}\n"  # data for scripts, byte for byte


# -- ordinary text and wide characters ----------------------------------------------------------

ORDINARY = ["plain ascii [x] \\n", "café crème", "cafe\u0301 combined", "日本", "日本語 🚀 wide"]


def test_ordinary_unicode_is_shown_as_typed_in_columns_measured_in_cells(
    cli: Cli, repo: Path, make_app: Callable[..., App]
) -> None:
    for number, title in enumerate(ORDINARY, start=1):
        assert _add(cli, repo, title) == number
        _set_task(make_app, number, last_error=f"error {number}")
    done = cli("list")
    assert done.code == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert len(rows) == len(ORDINARY)
    for number, (title, row) in enumerate(zip(ORDINARY, rows, strict=True), start=1):
        _assert_in_line(
            header,
            row,
            {"ID": str(number), "STATUS": "ready", "TITLE": title, "LAST ERROR": f"error {number}"},
        )
    for number, title in enumerate(ORDINARY, start=1):
        assert cli("show", str(number)).stdout.splitlines()[0] == f"task {number}: {title}"
    assert [t["title"] for t in cli("list", "--json").json()] == ORDINARY


# -- events --follow -----------------------------------------------------------------------------


def _read(stream: IO[str], lines: list[str]) -> None:
    for text in stream:
        lines.append(text)


def _dispatch(*args: str, cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "dispatch", *args], cwd=cwd, capture_output=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.one_backend
def test_follow_rows_line_up_with_the_header_above_them(cli: Cli, repo: Path, env: Env) -> None:
    """The columns are measured on the events there were; later ones are wider."""
    _add(cli, repo, "followed")  # event 1: created, - -> ready
    lines: list[str] = []
    with subprocess.Popen(
        [sys.executable, "-m", "dispatch", "events", "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=env.root,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        reader = threading.Thread(target=_read, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            wait_for(lambda: len(lines) >= 2 or None, "the header and the first event")
            _dispatch("cancel", "1", cwd=env.root)  # cancelled, ready -> cancelled
            _dispatch("reset", "1", cwd=env.root)  # reset, cancelled -> ready
            wait_for(lambda: any(" reset " in t for t in lines) or None, "the reset event")
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
        reader.join(timeout=10)
    events = cli("events", "--json").json()
    rows = [t.rstrip("\n") for t in lines if not t.startswith("ID ")]
    assert [int(r.split()[0]) for r in rows] == [e["id"] for e in events] == [1, 2, 3]
    header = ""
    for text in lines:
        if text.startswith("ID "):
            header = text.rstrip("\n")
            continue
        event = events[int(text.split()[0]) - 1]
        _assert_in_line(
            header,
            text.rstrip("\n"),
            {
                "ID": str(event["id"]),
                "TASK": "1",
                "KIND": event["kind"],
                "FROM": event["from_status"] or "-",
                "TO": event["to_status"],
            },
        )
