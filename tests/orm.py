"""The models as the tests' witness of the schema: an ORM session inside one of
`Database`'s own transactions (dispatch itself runs SQL text on Core connections).

The session joins the connection's transaction, so what a test changes through it
takes the same locks, retries and commit as the store's writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from dispatch.store.database import Database

T = TypeVar("T")


def orm_read(db: Database, work: Callable[[Session], T]) -> T:
    """`work` on a session in a read transaction; the objects it returns stay loaded."""
    return db.read(lambda conn: _in_session(conn, work))


def orm_write(db: Database, work: Callable[[Session], T]) -> T:
    """`work` on a session in one write transaction, flushed before it commits."""
    return db.write(lambda conn: _in_session(conn, work))


def _in_session(conn: Connection, work: Callable[[Session], T]) -> T:
    # Bound to a connection already in a transaction, the session never commits or ends
    # it: Database does, once `work` is flushed.
    with Session(conn, expire_on_commit=False) as session:
        result = work(session)
        session.flush()
        return result
