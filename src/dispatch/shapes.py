"""The JSON shapes of SPEC §5, one definition for the CLI's output and the monitor's API."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dispatch.services.dispatching import DispatchResult
    from dispatch.services.sweep import SweepReport
    from dispatch.services.tasks import TaskView
    from dispatch.store.statements import (
        AttemptRow,
        AttemptSummary,
        EventRow,
        TaskRow,
        TaskSummary,
    )


def iso(value: datetime | str | None) -> str | None:
    """A timestamp as JSON gives it; `list`'s summaries hold that text already."""
    if value is None or isinstance(value, str):
        return value
    return value.isoformat().replace("+00:00", "Z")


def attempt_json(a: AttemptRow | AttemptSummary) -> dict[str, Any]:
    return {
        "id": a.id,
        "task_id": a.task_id,
        "number": a.number,
        "state": a.state,
        "outcome": a.outcome,
        "exit_code": a.exit_code,
        "host": a.host,
        "tmux_target": a.tmux_target,
        "worktree": a.worktree,
        "branch": a.branch,
        "session_id": a.session_id,
        "started_at": iso(a.started_at),
        "ended_at": iso(a.ended_at),
        "heartbeat_at": iso(a.heartbeat_at),
        "error": a.error,
        "redispatch_of": a.redispatch_of,
    }


def task_json(
    t: TaskRow | TaskSummary, attempts: Sequence[AttemptRow] | None = None
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": t.id,
        "title": t.title,
        "status": t.status,
        "repo": t.repo,
        "agent": t.agent,
        "base_ref": t.base_ref,
        "priority": t.priority,
        "closed": t.closed_at is not None,
        "last_error": t.last_error,
        "created_at": iso(t.created_at),
        "updated_at": iso(t.updated_at),
        "branch": t.branch,
        "worktree": t.worktree,
    }
    if attempts is not None:
        data["attempts"] = [attempt_json(a) for a in attempts]
    return data


def event_json(e: EventRow) -> dict[str, Any]:
    return {
        "id": e.id,
        "task_id": e.task_id,
        "attempt_id": e.attempt_id,
        "kind": e.kind,
        "from_status": e.from_status,
        "to_status": e.to_status,
        "at": iso(e.at),
        "detail": e.detail,
    }


def task_detail_json(view: TaskView) -> dict[str, Any]:
    """`dispatch show --json`: the task with its attempts and its event timeline."""
    data = task_json(view.task, view.attempts)
    data["events"] = [event_json(e) for e in view.events]
    return data


def dispatch_result_json(result: DispatchResult) -> dict[str, Any]:
    """What `run` and `redispatch` print: the task and the attempt that started."""
    data: dict[str, Any] = {
        "task": task_json(result.task, result.attempts),
        "attempt": attempt_json(result.attempt),
    }
    if result.warnings:
        data["warnings"] = result.warnings
    return data


def sweep_json(report: SweepReport) -> dict[str, Any]:
    return {
        "checked": report.checked,
        "reaped": [
            {
                "task_id": r.task_id,
                "attempt_id": r.attempt_id,
                "reason": r.reason,
                "status": r.status,
            }
            for r in report.reaped
        ],
        "orphan_windows": report.orphan_windows,
        "orphan_worktrees": report.orphan_worktrees,
    }
