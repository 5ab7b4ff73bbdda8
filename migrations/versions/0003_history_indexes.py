"""indexes for list filters and the event log

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # `list` walks tasks in claim order (priority DESC, id); each filter has an index
    # that starts with its column and then keeps that order, so a page reads only its rows.
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index("ix_tasks_list_order", [sa.text("priority DESC"), "id"])
        # Open tasks (the default list, and its count) without reading the closed ones.
        batch_op.create_index("ix_tasks_open_order", ["closed_at", sa.text("priority DESC"), "id"])
        batch_op.create_index("ix_tasks_repo_order", ["repo", sa.text("priority DESC"), "id"])
        batch_op.create_index("ix_tasks_agent_order", ["agent", sa.text("priority DESC"), "id"])
    # `list --host`: the tasks whose attempts ran on a host.
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.create_index("ix_attempts_host_task_id", ["host", "task_id"])
    # `events --since`: the first event at or after a time.
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_at", ["at"])


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_at")
    with op.batch_alter_table("attempts", schema=None) as batch_op:
        batch_op.drop_index("ix_attempts_host_task_id")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_agent_order")
        batch_op.drop_index("ix_tasks_repo_order")
        batch_op.drop_index("ix_tasks_open_order")
        batch_op.drop_index("ix_tasks_list_order")
