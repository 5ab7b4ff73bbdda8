"""The wrapper's nudge to a waiting dispatcher (adapters.wakeup)."""

from __future__ import annotations

import threading

import pytest

from dispatch.adapters import wakeup


def _name(suffix: str) -> str:
    return wakeup.address(f"sqlite:////tmp/test-wakeup-{suffix}.db", 7)


def test_a_nudge_wakes_the_waiter_and_is_taken_once() -> None:
    waiter = wakeup.listen(_name("once"))
    if waiter is None:
        pytest.skip("no abstract Unix sockets here")
    try:
        assert waiter.wait(0.01) is False  # nothing sent yet
        wakeup.nudge(_name("once"))
        wakeup.nudge(_name("once"))
        assert waiter.wait(5) is True
        assert waiter.wait(0.01) is False  # both nudges were taken by the one wake
        threading.Timer(0.05, wakeup.nudge, args=(_name("once"),)).start()
        assert waiter.wait(5) is True  # while waiting
    finally:
        waiter.close()


def test_names_differ_by_database_and_attempt_and_one_name_has_one_waiter() -> None:
    assert wakeup.address("sqlite:////a.db", 1) != wakeup.address("sqlite:////b.db", 1)
    assert wakeup.address("sqlite:////a.db", 1) != wakeup.address("sqlite:////a.db", 2)
    first = wakeup.listen(_name("taken"))
    if first is None:
        pytest.skip("no abstract Unix sockets here")
    try:
        assert wakeup.listen(_name("taken")) is None  # the caller then polls
    finally:
        first.close()
    again = wakeup.listen(_name("taken"))  # free once closed: nothing is left behind
    assert again is not None
    again.close()


def test_a_nudge_nobody_waits_for_is_harmless() -> None:
    wakeup.nudge(_name("nobody"))
