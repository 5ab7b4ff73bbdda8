"""The monitor's task list as kept between requests (`web.board`), on a real database:
pages with different filters keep their own answers, and only changed rows are shaped
again."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from dispatch.app import App
from dispatch.store import statements as st
from dispatch.store.pages import StoredRow
from dispatch.web import board as board_module
from dispatch.web.board import KEPT_FILTERS, BoardJson
from tests.conftest import Result

# For the suite's time: what it keeps does not depend on the backend.
pytestmark = pytest.mark.one_backend

Cli = Callable[..., Result]


@pytest.fixture
def shaped(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every row the board shapes into JSON, in order (the real shaping still runs)."""
    seen: list[object] = []
    real = board_module._encode

    def counting(row: StoredRow) -> bytes:
        seen.append(row)
        return real(row)

    monkeypatch.setattr(board_module, "_encode", counting)
    return seen


def _ids(body: bytes) -> list[int]:
    return [task["id"] for task in json.loads(body)]


def test_pages_with_different_filters_keep_their_own_answers(
    cli: Cli, repo: Path, make_app: Callable[..., App], shaped: list[object]
) -> None:
    ids = [cli("add", title, cwd=repo).stdout.strip() for title in ("a", "b", "c")]
    app = make_app()
    board = BoardJson()
    everything = board.answer(app, [], False)
    ready = board.answer(app, ["ready"], False)
    assert _ids(everything) == _ids(ready) == sorted(map(int, ids))
    assert len(shaped) == 3  # the second filter's rows were the first one's

    # Two pages asking in turn: each gets its own kept answer, nothing is read again.
    for _ in range(3):
        assert board.answer(app, [], False) is everything
        assert board.answer(app, ["ready"], False) is ready
    assert len(shaped) == 3

    # One task changes: each filter reads again, and only that row is shaped again.
    app.direct.write(lambda tx: st.update_task(tx, int(ids[1]), priority=5))
    changed = board.answer(app, [], False)
    assert changed is not everything and len(shaped) == 4
    assert _ids(changed)[0] == int(ids[1])  # the higher priority now lists first
    assert board.answer(app, ["ready"], False) == changed
    assert len(shaped) == 4
    assert changed == BoardJson().answer(app, [], False)  # byte for byte a fresh answer


def test_only_the_filters_asked_last_are_kept(
    cli: Cli, repo: Path, make_app: Callable[..., App], shaped: list[object]
) -> None:
    cli("add", "a", cwd=repo)
    app = make_app()
    board = BoardJson()
    filters = [["ready"], ["failed"], ["done"], ["cancelled"], ["in-progress"]]
    assert len(filters) == KEPT_FILTERS + 1
    first = board.answer(app, filters[0], False)
    for statuses in filters[1:]:
        board.answer(app, statuses, False)
    # The oldest was let go: it is read again (the same bytes, a new answer).
    again = board.answer(app, filters[0], False)
    assert again == first and again is not first
    assert len(board._answers) == KEPT_FILTERS
    # Asking a kept one keeps it: the one asked longest ago goes next.
    board.answer(app, filters[2], False)
    board.answer(app, ["done", "failed"], False)
    assert list(board._answers) == [
        (("in-progress",), False),
        (("ready",), False),
        (("done",), False),
        (("done", "failed"), False),
    ]


def test_a_read_that_fails_keeps_what_was_kept(
    cli: Cli,
    repo: Path,
    make_app: Callable[..., App],
    shaped: list[object],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cli("add", "a", cwd=repo)
    app = make_app()
    board = BoardJson()
    everything = board.answer(app, [], False)

    def failing(*args: object, **kwargs: object) -> object:
        raise OSError("disk I/O error")

    with monkeypatch.context() as patch:
        patch.setattr(board_module, "stored_board", failing)
        with pytest.raises(OSError, match="disk I/O error"):
            board.answer(app, ["ready"], False)
    assert board.answer(app, [], False) is everything
    assert list(board._answers) == [((), False)]
    assert len(shaped) == 1
