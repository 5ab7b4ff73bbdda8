"""`dispatch list`: read without SQLAlchemy where it can, since scripts run it in loops."""

from __future__ import annotations

from collections.abc import Sequence

from dispatch.app import App
from dispatch.errors import UsageError
from dispatch.lifecycle import Status
from dispatch.store.statements import TaskSummary
from dispatch.store.statements import list_tasks as read_tasks


def list_tasks(
    app: App, statuses: Sequence[str] = (), include_closed: bool = False
) -> list[TaskSummary]:
    valid = {s.value for s in Status}
    for status in statuses:
        if status not in valid:
            raise UsageError(f"unknown status {status!r} (one of: {', '.join(sorted(valid))})")
    return read_tasks(app.direct, sorted(set(statuses)), include_closed)
