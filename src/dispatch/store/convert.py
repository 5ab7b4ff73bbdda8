"""How a Python value becomes a stored parameter, and how a stored value comes back:
the one table both executors and the models' `UTCDateTime` use.

| Python value      | SQLite stores                 | PostgreSQL stores     | read back as         |
|-------------------|-------------------------------|-----------------------|----------------------|
| aware `datetime`  | naive UTC text, `SQLITE_TIME` | naive UTC `timestamp` | aware UTC `datetime` |
| `dict`, `list`    | JSON text                     | `json` (the driver's) | the decoded value    |
| `Enum`            | its value                     | its value             | the value            |
| None, int, str, … | as it is                      | as it is              | as it is             |

Standard library only: the SQLite path runs without SQLAlchemy.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from enum import Enum
from typing import Any

# The text SQLAlchemy's DateTime keeps in SQLite, and so what both executors write
# there: one format whichever way a row was written.
SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"

_AS_IS = {int, str, float, bool, bytes}


def naive_utc(value: datetime) -> datetime:
    """A timestamp as the columns keep it: UTC without a zone (refusing a naive one,
    whose zone nobody knows)."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.replace(tzinfo=None)


def sqlite_time(value: datetime) -> str:
    """A timestamp as SQLite keeps it, `SQLITE_TIME`, at half strftime's cost."""
    if value.tzinfo is None:
        raise ValueError("naive datetime given to a UTC column")
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    # "YYYY-MM-DD HH:MM:SS.ffffff+00:00" with the zone cut off.
    return value.isoformat(" ", "microseconds")[:26]


def to_sqlite(value: Any) -> Any:
    """A parameter as SQLite stores it."""
    kind = type(value)
    if value is None or kind in _AS_IS:
        return value
    if isinstance(value, datetime):
        return sqlite_time(value)
    if isinstance(value, dict | list):
        return json.dumps(value)  # what SQLAlchemy's JSON type writes
    if isinstance(value, Enum):
        return value.value
    return value


def sqlite_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    """A statement's parameters as SQLite stores them, for either executor."""
    return {k: to_sqlite(v) for k, v in (params or {}).items()}


def to_engine(value: Any) -> Any:
    """A parameter as SQLAlchemy binds it on another backend: JSON is left to the
    driver (the statement types it), timestamps go as naive UTC."""
    kind = type(value)
    if value is None or kind in _AS_IS:
        return value
    if isinstance(value, datetime):
        return naive_utc(value)
    if isinstance(value, Enum):
        return value.value
    return value


def stored_time(value: Any) -> datetime | None:
    """A stored timestamp as an aware UTC datetime (SQLite keeps text, others datetimes)."""
    if value is None:
        return None
    if isinstance(value, str):
        # Stored naive UTC; parsing it as UTC is half the cost of parsing, then replacing.
        return datetime.fromisoformat(value + "+00:00")
    return value.replace(tzinfo=UTC)  # type: ignore[no-any-return]


def iso_utc(value: Any) -> str | None:
    """A stored timestamp as the ISO 8601 text JSON output gives it (`…Z`), without
    parsing it: `list` renders 30,000 of them. Equal to `datetime.isoformat`, which
    leaves out a zero fraction."""
    if value is None:
        return None
    if isinstance(value, str):  # SQLite: SQLITE_TIME, naive UTC
        text = value.replace(" ", "T", 1)
        return text.removesuffix(".000000") + "Z"
    return value.replace(tzinfo=UTC).isoformat().replace("+00:00", "Z")  # type: ignore[no-any-return]


def json_value(value: Any) -> Any:
    """A JSON column as read back: SQLite keeps text, other backends decode it."""
    return json.loads(value) if isinstance(value, str) else value
