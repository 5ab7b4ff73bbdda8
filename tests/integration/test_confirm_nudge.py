"""The dispatcher's confirm wakes on the real wrapper's nudge, and without one still
confirms by looking (adapters.wakeup)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dispatch.adapters import wakeup
from dispatch.app import App
from dispatch.services import dispatching
from dispatch.services.tasks import add_task
from tests.conftest import Env
from tests.faults import agent_profile, write_config


def _add(make_app: Callable[..., App], repo: Path) -> tuple[App, int]:
    app = make_app()
    return app, add_task(app, "nudged", prompt="p", repo=repo, agent="napper").id


def test_confirm_is_woken_by_the_wrappers_nudge(
    env: Env, repo: Path, make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(env, agent_profile("napper", ["sleep", "30"]))
    woken: list[bool] = []
    real_listen = wakeup.listen

    def listen(name: str) -> wakeup.Waiter | None:
        waiter = real_listen(name)
        if waiter is None:
            pytest.skip("no abstract Unix sockets here")
        real_wait = waiter.wait

        def wait(seconds: float) -> bool:
            woken.append(real_wait(seconds))
            return woken[-1]

        monkeypatch.setattr(waiter, "wait", wait)
        return waiter

    monkeypatch.setattr(dispatching, "listen", listen)
    # Confirm would look again only after far longer than the spawn timeout: only the
    # nudge can end its wait in time.
    monkeypatch.setattr(dispatching, "NUDGED_POLL_SECONDS", 60.0)
    monkeypatch.setattr(dispatching, "WINDOW_CHECK_SECONDS", 60.0)
    app, task_id = _add(make_app, repo)
    result = dispatching.dispatch_task(app, task_id)
    assert result is not None and result.attempt.agent_pid is not None
    assert result.task.status == "in-progress"
    assert woken and all(woken)  # each wait was ended by a nudge, none by its timeout


def test_confirm_without_a_nudge_still_confirms_by_looking(
    env: Env, repo: Path, make_app: Callable[..., App], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(env, agent_profile("napper", ["sleep", "30"]))
    monkeypatch.setattr(dispatching, "listen", lambda name: None)
    app, task_id = _add(make_app, repo)
    result = dispatching.dispatch_task(app, task_id)
    assert result is not None and result.attempt.agent_pid is not None
    assert result.attempt.state == "running"
