"""`dispatch gc` and `dispatch restore` at the command line: usage, exit codes, JSON."""

from __future__ import annotations

import json
from typing import Any

from tests.faults import run_cli


def test_gc_with_nothing_to_do_prints_the_empty_shape(capsys: Any) -> None:
    code, out, _ = run_cli(capsys, "gc", "--json")
    assert code == 0
    assert json.loads(out) == {"removed": [], "kept": [], "freed_bytes": 0}


def test_gc_refuses_a_bad_duration_as_usage(capsys: Any) -> None:
    code, out, err = run_cli(capsys, "gc", "--older-than", "soon")
    assert code == 2 and out == ""
    assert err.startswith("dispatch: error: --older-than: not a duration") and err.count("\n") == 1

    code, out, _ = run_cli(capsys, "gc", "--older-than", "soon", "--json")
    assert code == 2 and json.loads(out)["error"]["kind"] == "usage"


def test_restore_of_an_unknown_task_is_not_found(capsys: Any) -> None:
    code, out, _ = run_cli(capsys, "restore", "7", "--json")
    assert code == 4
    assert json.loads(out)["error"] == {"code": 4, "kind": "not-found", "message": "no task 7"}
