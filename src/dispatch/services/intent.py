"""The write-ahead intent: what a dispatch is about to create, and what existed before.

Recorded on the attempt before each external action, so that whoever undoes the
dispatch (its own saga, or a sweep after the dispatcher died) removes exactly what
this attempt made and never what was there before it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Intent:
    repo: str | None = None
    base: str | None = None
    branch: str | None = None
    branch_existed: bool = False
    worktree: str | None = None
    worktree_existed: bool = False
    # The branch an existing worktree was on before this attempt switched it to `branch`.
    switched_from: str | None = None
    session: str | None = None
    window_name: str | None = None
    window_id: str | None = None

    @classmethod
    def of(cls, stored: Mapping[str, Any] | None) -> Intent:
        """The intent as an attempt row keeps it (keys this version does not know are
        passed over: a row written by another version is still undone)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (stored or {}).items() if k in known})

    def stored(self) -> dict[str, Any]:
        """The JSON the attempt row keeps: what was set."""
        return {k: v for k, v in asdict(self).items() if v is not None}
