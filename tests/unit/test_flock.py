"""The file lock every worktree change, task guard, undo and migration takes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatch.flock import FileLock, LockHeld

# A process that takes the lock, says so, and holds it until killed.
HOLDER = (
    "import sys, time\n"
    "from dispatch.flock import FileLock\n"
    "lock = FileLock(sys.argv[1])\n"
    "lock.acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


@contextlib.contextmanager
def _held_elsewhere(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the lock on `path`, killed (if still alive) afterwards."""
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "held"
            yield proc
        finally:
            proc.kill()


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_reentrant_in_its_thread_and_released_by_the_last_exit(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    lock = FileLock(path)
    before = _open_fds()
    with lock, lock:
        with lock:
            pass
        other = FileLock(path, timeout=0)
        with pytest.raises(TimeoutError):
            other.acquire()  # still held after the inner exits
    assert _open_fds() == before  # the descriptor is closed, nothing leaks
    with FileLock(path, timeout=0):
        pass


def test_excludes_another_thread_until_released(tmp_path: Path) -> None:
    lock = FileLock(tmp_path / "a.lock", timeout=0.2)
    order: list[str] = []
    lock.acquire()

    def second() -> None:
        with lock:
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.1)
    order.append("first released")
    lock.release()
    thread.join(5)
    assert order == ["first released", "second"]

    lock.acquire()
    failed: list[BaseException] = []
    thread = threading.Thread(target=lambda: _expect_timeout(lock, failed))
    thread.start()
    thread.join(5)
    lock.release()
    assert len(failed) == 1 and isinstance(failed[0], TimeoutError)


def _expect_timeout(lock: FileLock, failed: list[BaseException]) -> None:
    try:
        lock.acquire()
    except TimeoutError as exc:
        failed.append(exc)
    else:
        lock.release()


def test_another_process_times_out_then_takes_it_once_the_holder_is_killed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.lock"
    with _held_elsewhere(path) as proc:
        lock = FileLock(path, timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="held by another process"):
            lock.acquire()
        assert 0.3 <= time.monotonic() - started < 5
        # A failed attempt leaves nothing half taken: the next one works normally.
        proc.send_signal(signal.SIGKILL)  # the kernel releases a dead holder's lock
        proc.wait(10)
        with FileLock(path, timeout=5):
            pass
        with lock:
            pass


def test_waiting_without_a_timeout_ends_when_the_holder_dies(tmp_path: Path) -> None:
    path = tmp_path / "a.lock"
    taken = threading.Event()

    def wait_for_it() -> None:
        with FileLock(path):
            taken.set()

    with _held_elsewhere(path) as proc:
        thread = threading.Thread(target=wait_for_it, daemon=True)
        thread.start()
        assert not taken.wait(0.3)
        proc.kill()
        assert taken.wait(10)
    thread.join(5)


def test_an_acquire_that_fails_leaves_the_lock_free_for_other_threads(tmp_path: Path) -> None:
    """Its file cannot be opened (no directory): the error is raised as it is, and
    neither the descriptor nor the lock between threads is kept."""
    path = tmp_path / "missing" / "a.lock"
    lock = FileLock(path, timeout=0)
    before = _open_fds()
    with pytest.raises(FileNotFoundError):
        lock.acquire()
    assert _open_fds() == before
    path.parent.mkdir()
    taken: list[bool] = []

    def other_thread() -> None:
        with lock:
            taken.append(True)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join(5)
    assert taken == [True]


def test_a_lock_that_stays_held_raises_its_own_error(tmp_path: Path) -> None:
    """LockHeld, a TimeoutError of its own, so callers never take another for it."""
    path = tmp_path / "a.lock"
    with FileLock(path), pytest.raises(LockHeld):
        FileLock(path, timeout=0).acquire()
