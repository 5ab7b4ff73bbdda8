"""`dispatch serve` through HTTP: a real server on 127.0.0.1, real git, tmux and SQLite."""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dispatch.store import statements as st
from dispatch.store.direct import Tx
from tests.conftest import TMUX, Env, MakeApp, Result, windows
from tests.faults import attempts, events, task, wait_for, wait_status
from tests.integration.monitor import Server, serving
from tests.integration.recovery_helpers import signal_quietly

# For the suite's time: the services it serves run on both backends in their own tests.
pytestmark = pytest.mark.one_backend

Cli = Callable[..., Result]
Serve = Callable[..., Server]


@pytest.fixture
def serve(env: Env) -> Iterator[Serve]:
    yield from serving(env)


def _add(cli: Cli, repo: Path, title: str, prompt: str) -> int:
    done = cli("add", title, "--agent", "shell", "--prompt", prompt, cwd=repo)
    assert done.code == 0, done.stderr
    return int(done.stdout)


def _failed(cli: Cli, repo: Path, env: Env, title: str = "broken") -> int:
    """A task whose first attempt failed (its agent exits 3)."""
    task_id = _add(cli, repo, title, "echo trying; exit 3")
    assert cli("run", str(task_id)).code == 0
    assert wait_status(env, task_id) == "failed"
    return task_id


def _running(cli: Cli, repo: Path, title: str = "busy") -> int:
    task_id = _add(cli, repo, title, "echo started; sleep 60")
    done = cli("run", str(task_id))
    assert done.code == 0, done.stderr
    return task_id


# -- the process -------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_prints_its_url_first_and_stops_with_exit_0(serve: Serve, env: Env, signum: int) -> None:
    server = serve()
    assert server.get("/api/health", token=None).json()["ok"] is True  # it accepts at once
    stream = server.stream()  # an open stream must not hold the shutdown
    assert server.stop(signum) == 0
    stream.close()
    assert "Traceback" not in server.stderr


def test_the_token_is_kept_0600_reused_and_replaced_on_request(serve: Serve, env: Env) -> None:
    first = serve()
    token_file = env.home / "serve-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert token_file.read_text().strip() == first.token
    assert first.stop() == 0

    again = serve()
    assert again.token == first.token
    assert again.stop() == 0

    renewed = serve("--new-token")
    assert renewed.token != first.token
    assert token_file.read_text().strip() == renewed.token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert renewed.get("/api/tasks", token=first.token).status == 401


def test_a_port_in_use_is_one_line_and_exit_7(serve: Serve, cli: Cli) -> None:
    server = serve()
    done = cli("serve", "--port", str(server.port), timeout=20)
    assert done.code == 7
    assert done.stdout == ""
    assert f"port {server.port} on 127.0.0.1 is in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bad_sweep_interval_is_a_usage_error(cli: Cli) -> None:
    done = cli("serve", "--sweep-every", "soon")
    assert done.code == 2
    assert "--sweep-every: not a duration" in done.stderr


def test_a_non_loopback_address_warns(serve: Serve, cli: Cli) -> None:
    # 0.0.0.0 is not loopback; the URL names it, so the first line differs from URL's pattern.
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch", "serve", "--host", "0.0.0.0", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()
        assert line.startswith("http://0.0.0.0:") and "#token=" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert "warning: serving on 0.0.0.0, not a loopback address" in err


# -- who may ask -----------------------------------------------------------------------------


def test_every_api_request_but_health_needs_the_token(serve: Serve) -> None:
    server = serve()
    assert server.get("/api/health", token=None).json() == {"ok": True, "version": "0.1.0"}
    for path in ("/api/tasks", "/api/tasks/1", "/api/events", "/api/tasks/1/log"):
        for token in (None, "wrong", server.token[:-1]):
            answer = server.get(path, token=token)
            assert answer.status == 401, (path, token)
            assert answer.error["kind"] == "unauthorized"
    answer = server.post("/api/tasks/1/redispatch", token=None)
    assert answer.status == 401
    basic = server.get("/api/tasks", token=None, headers={"Authorization": f"Basic {server.token}"})
    assert basic.status == 401
    assert server.get("/api/tasks").status == 200


def test_a_foreign_host_header_is_refused(serve: Serve) -> None:
    """DNS rebinding: a page at evil.example whose name now resolves to 127.0.0.1."""
    server = serve()
    for host in ("evil.example", f"evil.example:{server.port}", "127.0.0.1", "localhost:1"):
        for path in ("/", "/api/health", "/api/tasks"):
            answer = server.get(path, headers={"Host": host})
            assert answer.status == 403, (host, path)
    for host in (f"127.0.0.1:{server.port}", f"localhost:{server.port}", f"[::1]:{server.port}"):
        assert server.get("/api/tasks", headers={"Host": host}).status == 200, host


def test_another_origin_gets_no_cors_header_and_no_cookie(serve: Serve) -> None:
    server = serve()
    preflight = server.request(
        "OPTIONS",
        "/api/tasks/1/redispatch",
        token=None,
        headers={
            "Origin": "http://evil.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert preflight.status in (401, 405)  # refused: no token, no such method
    answers = [
        preflight,
        server.get("/api/tasks", headers={"Origin": "http://evil.example"}),
        server.get("/", token=None),
    ]
    for answer in answers:
        assert not [h for h in answer.headers if h.startswith("access-control-")]
        assert "set-cookie" not in answer.headers


# -- reading ---------------------------------------------------------------------------------


def test_tasks_come_with_their_latest_attempt(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    failed = _failed(cli, repo, env)
    ready = _add(cli, repo, "waiting", "true")
    server = serve()

    listed = server.get("/api/tasks").json()

    by_id = {t["id"]: t for t in listed}
    assert by_id[failed]["status"] == "failed"
    assert by_id[failed]["attempt"]["number"] == 1
    assert by_id[failed]["attempt"]["outcome"] == "failed"
    assert by_id[failed]["attempt"]["host"]
    assert by_id[ready]["attempt"] is None
    assert [t["id"] for t in server.get("/api/tasks?status=ready").json()] == [ready]
    bad = server.get("/api/tasks?status=sleeping")
    assert bad.status == 400
    assert "unknown status 'sleeping'" in bad.error["message"]


def test_a_changed_task_lists_as_changed(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    # The server keeps each row's JSON between requests: a row read differently must be
    # shaped again, and the whole answer must be what a server that kept nothing gives.
    failed = _failed(cli, repo, env)
    other = _add(cli, repo, "waiting", "true")
    server = serve()
    before = server.get("/api/tasks").json()
    assert {t["id"]: t["status"] for t in before} == {failed: "failed", other: "ready"}

    assert cli("reset", str(failed)).code == 0
    assert cli("close", str(other)).code == 0
    after = server.get("/api/tasks?all=1")

    assert {t["id"]: (t["status"], t["closed"]) for t in after.json()} == {
        failed: ("ready", False),
        other: ("ready", True),
    }
    assert after.body == serve().get("/api/tasks?all=1").body
    assert server.get("/api/tasks?all=1").body == after.body  # nothing changed since

    # A change the server makes itself (SQLite does not count its own connection's
    # commits as changes) shows on the next read too.
    assert server.post(f"/api/tasks/{failed}/cancel").status == 200
    cancelled = {t["id"]: t["status"] for t in server.get("/api/tasks?all=1").json()}
    assert cancelled[failed] == "cancelled"


def test_closed_tasks_only_with_all(serve: Serve, cli: Cli, repo: Path) -> None:
    kept = _add(cli, repo, "kept", "true")
    closed = _add(cli, repo, "archived", "true")
    assert cli("close", str(closed)).code == 0
    server = serve()
    assert [t["id"] for t in server.get("/api/tasks").json()] == [kept]
    assert [t["id"] for t in server.get("/api/tasks?all=1").json()] == [kept, closed]


def test_a_task_reads_as_show_json_does(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    task_id = _failed(cli, repo, env)
    server = serve()
    answer = server.get(f"/api/tasks/{task_id}")
    assert answer.status == 200
    assert answer.json() == cli("show", str(task_id), "--json").json()
    assert [e["kind"] for e in answer.json()["events"]][:2] == ["created", "claimed"]


@pytest.mark.parametrize(
    ("path", "status", "words"),
    [
        ("/api/tasks/99", 404, "no task 99"),
        ("/api/tasks/x", 400, "the task id must be a whole number"),
        ("/api/tasks/0", 400, "at least 1"),
        ("/api/tasks/%C2%B2", 400, "whole number"),
        ("/api/tasks/" + "9" * 40, 400, "whole number"),
        ("/api/tasks/1/log?tail=" + "9" * 5000, 400, "whole number"),
        ("/api/tasks/99/log", 404, "no task 99"),
        ("/api/tasks/99/diff", 404, "no task 99"),
        ("/api/nothing", 404, "not found"),
    ],
)
def test_reading_what_is_not_there(serve: Serve, path: str, status: int, words: str) -> None:
    answer = serve().get(path)
    assert answer.status == status
    assert words in answer.error["message"]
    assert answer.error["code"] == {404: 4, 400: 2}[status]


def test_the_log_and_its_tail(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    task_id = _failed(cli, repo, env)
    never = _add(cli, repo, "never run", "true")
    server = serve()

    def log() -> str:
        answer = server.get(f"/api/tasks/{task_id}/log")
        return answer.text if "trying" in answer.text else ""

    whole = wait_for(log, "the log to hold the agent's output")
    assert server.get(f"/api/tasks/{task_id}/log").headers["content-type"].startswith("text/plain")
    tail = server.get(f"/api/tasks/{task_id}/log?tail=5").text
    assert tail == whole[-5:]
    assert server.get(f"/api/tasks/{task_id}/log?attempt=1").text == whole
    missing = server.get(f"/api/tasks/{task_id}/log?attempt=7")
    assert missing.status == 404
    assert missing.error["message"] == f"task {task_id} has no attempt number 7"
    assert server.get(f"/api/tasks/{never}/log").status == 404
    assert server.get(f"/api/tasks/{task_id}/log?tail=-1").status == 400


def test_the_diff_shows_commits_then_uncommitted_work(
    serve: Serve, cli: Cli, repo: Path, env: Env, git: Callable[..., str]
) -> None:
    script = (
        "echo committed > done.txt && git add done.txt && git commit -qm work"
        " && echo changed >> README.md && echo fresh > new.txt && exit 1"
    )
    task_id = _add(cli, repo, "edits", script)
    assert cli("run", str(task_id)).code == 0
    assert wait_status(env, task_id) == "failed"
    never = _add(cli, repo, "never run", "true")
    server = serve()

    answer = server.get(f"/api/tasks/{task_id}/diff")

    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    committed, readme, fresh = (
        text.index("diff --git a/done.txt b/done.txt"),
        text.index("diff --git a/README.md b/README.md"),
        text.index("b/new.txt"),
    )
    assert committed < readme < fresh
    assert "+committed" in text and "+changed" in text and "+fresh" in text
    assert "main" in git(repo, "branch", "--show-current")  # nothing changed in the repo
    undispatched = server.get(f"/api/tasks/{never}/diff")
    assert undispatched.status == 404
    assert "has no branch yet" in undispatched.error["message"]


# -- acting ----------------------------------------------------------------------------------


def test_redispatch_starts_a_new_attempt(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    task_id = _failed(cli, repo, env)
    first = attempts(env, task_id)[0]
    server = serve()

    answer = server.post(f"/api/tasks/{task_id}/redispatch?expected_attempt=1")

    assert answer.status == 202, answer.body
    body = answer.json()
    second = attempts(env, task_id)[-1]
    assert (body["task_id"], body["attempt_id"]) == (task_id, second["id"])
    assert body["attempt"]["number"] == 2
    assert body["attempt"]["redispatch_of"] == first["id"]
    assert [a["number"] for a in body["task"]["attempts"]] == [1, 2]
    assert [e["kind"] for e in events(env, task_id, "redispatched")] == ["redispatched"]


def test_redispatch_refusals(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    running = _running(cli, repo)
    ready = _add(cli, repo, "waiting", "true")
    closed = _failed(cli, repo, env, "archived")
    assert cli("close", str(closed)).code == 0
    server = serve()
    window = attempts(env, running)[-1]["tmux_target"]

    busy = server.post(f"/api/tasks/{running}/redispatch")
    assert (busy.status, busy.error["code"], busy.error["kind"]) == (409, 3, "conflict")
    assert window in busy.error["message"]
    not_retryable = server.post(f"/api/tasks/{ready}/redispatch")
    assert not_retryable.status == 409
    assert "ready" in not_retryable.error["message"]
    gone = server.post(f"/api/tasks/{closed}/redispatch")
    assert (gone.status, gone.error["code"]) == (410, 5)
    assert "reopen" in gone.error["message"]
    missing = server.post("/api/tasks/99/redispatch")
    assert (missing.status, missing.error["code"]) == (404, 4)
    assert server.get(f"/api/tasks/{ready}/redispatch").status == 405
    assert len(attempts(env, running)) == 1 and attempts(env, ready) == []


SHIM = """#!/bin/sh
# tmux, except that new-window fails (FAIL exists) or waits for RELEASE (HOLD exists).
for arg in "$@"; do
  if [ "$arg" = new-window ]; then
    [ -e "{dir}/FAIL" ] && {{ echo "shim: new-window refused" >&2; exit 1; }}
    if [ -e "{dir}/HOLD" ]; then
      touch "{dir}/HELD"
      while [ ! -e "{dir}/RELEASE" ]; do sleep 0.05; done
    fi
  fi
done
exec "{real}" "$@"
"""


def _shimmed_path(tmp_path: Path) -> tuple[Path, str]:
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    (shim_dir / "tmux").write_text(SHIM.format(dir=shim_dir, real=TMUX))
    (shim_dir / "tmux").chmod(0o755)
    return shim_dir, f"{shim_dir}{os.pathsep}{os.environ['PATH']}"


def test_a_rolled_back_redispatch_is_500_dispatch_failed(
    serve: Serve, cli: Cli, repo: Path, env: Env, tmp_path: Path
) -> None:
    task_id = _failed(cli, repo, env)
    shim_dir, path = _shimmed_path(tmp_path)
    server = serve(path=path)
    (shim_dir / "FAIL").touch()

    answer = server.post(f"/api/tasks/{task_id}/redispatch")

    assert answer.status == 500
    assert (answer.error["code"], answer.error["kind"]) == (6, "dispatch-failed")
    assert "failed at spawn" in answer.error["message"]
    assert "shim: new-window refused" in answer.error["message"]
    assert task(env, task_id)["status"] == "failed"  # rolled back
    assert attempts(env, task_id)[-1]["outcome"] == "dispatch-failed"


def test_a_slow_redispatch_does_not_block_other_requests(
    serve: Serve, cli: Cli, repo: Path, env: Env, tmp_path: Path
) -> None:
    task_id = _failed(cli, repo, env)
    shim_dir, path = _shimmed_path(tmp_path)
    server = serve(path=path)
    (shim_dir / "HOLD").touch()
    answers: list[int] = []
    clicker = threading.Thread(
        target=lambda: answers.append(server.post(f"/api/tasks/{task_id}/redispatch").status)
    )
    clicker.start()
    try:
        wait_for((shim_dir / "HELD").exists, "the redispatch to reach tmux")

        # The saga is stuck in tmux until RELEASE: these answers cannot wait for it.
        listed = server.get("/api/tasks", timeout=10)
        shown = server.get(f"/api/tasks/{task_id}", timeout=10)
        health = server.get("/api/health", timeout=10)
        assert clicker.is_alive() and not answers
    finally:
        (shim_dir / "RELEASE").touch()
        clicker.join(30)
    assert listed.status == shown.status == health.status == 200
    assert [t["status"] for t in listed.json()] == ["in-progress"]
    assert answers == [202]


def test_five_simultaneous_clicks_start_one_attempt(
    serve: Serve, cli: Cli, repo: Path, env: Env
) -> None:
    task_id = _failed(cli, repo, env)
    server = serve()
    barrier = threading.Barrier(5)
    answers: list[int] = []
    lock = threading.Lock()

    def click() -> None:
        barrier.wait()
        status = server.post(f"/api/tasks/{task_id}/redispatch?expected_attempt=1").status
        with lock:
            answers.append(status)

    clickers = [threading.Thread(target=click) for _ in range(5)]
    for c in clickers:
        c.start()
    for c in clickers:
        c.join(60)

    assert sorted(answers) == [202, 409, 409, 409, 409]
    assert [a["number"] for a in attempts(env, task_id)] == [1, 2]
    assert len(events(env, task_id, "redispatched")) == 1


def test_a_stale_expected_attempt_is_refused(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    task_id = _failed(cli, repo, env)
    server = serve()
    assert cli("redispatch", str(task_id)).code == 0  # from the CLI, behind the page's back
    wait_status(env, task_id)

    for verb in ("redispatch", "reset", "cancel"):
        stale = server.post(f"/api/tasks/{task_id}/{verb}?expected_attempt=1")
        assert (stale.status, stale.error["code"]) == (409, 3), verb
        assert "has moved on" in stale.error["message"] and "attempt 2" in stale.error["message"]
    assert len(attempts(env, task_id)) == 2
    assert server.post(f"/api/tasks/{task_id}/redispatch?expected_attempt=x").status == 400
    assert server.post(f"/api/tasks/{task_id}/redispatch?expected_attempt=2").status == 202


def test_cancel(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    running = _running(cli, repo)
    ready = _add(cli, repo, "waiting", "true")
    done = _add(cli, repo, "quick", "true")
    assert cli("run", str(done)).code == 0
    assert wait_status(env, done) == "done"
    server = serve()

    stopped = server.post(f"/api/tasks/{running}/cancel?expected_attempt=1")
    assert stopped.status == 200, stopped.body
    assert stopped.json()["task"]["status"] == "cancelled"
    assert f"t{running}" not in windows(env)
    again = server.post(f"/api/tasks/{running}/cancel")
    assert again.status == 200
    assert again.json()["notices"] == [f"task {running} is already cancelled"]
    assert server.post(f"/api/tasks/{ready}/cancel").json()["task"]["status"] == "cancelled"
    refused = server.post(f"/api/tasks/{done}/cancel")
    assert refused.status == 409
    assert "done" in refused.error["message"]
    assert server.post("/api/tasks/99/cancel").status == 404


def test_reset(serve: Serve, cli: Cli, repo: Path, env: Env) -> None:
    failed = _failed(cli, repo, env)
    ready = _add(cli, repo, "waiting", "true")
    closed = _failed(cli, repo, env, "archived")
    assert cli("close", str(closed)).code == 0
    server = serve()

    answer = server.post(f"/api/tasks/{failed}/reset?expected_attempt=1")
    assert answer.status == 200
    assert answer.json()["task"]["status"] == "ready"
    assert task(env, failed)["status"] == "ready"
    assert server.post(f"/api/tasks/{ready}/reset").status == 409
    gone = server.post(f"/api/tasks/{closed}/reset")
    assert (gone.status, gone.error["kind"]) == (410, "gone")
    assert server.post("/api/tasks/99/reset").status == 404


# -- the event stream ------------------------------------------------------------------------


def test_the_stream_delivers_changes_made_by_the_cli(serve: Serve, cli: Cli, repo: Path) -> None:
    server = serve()
    stream = server.stream()
    try:
        assert stream.response.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["cache-control"] == "no-cache"
        assert stream.headers["x-accel-buffering"] == "no"
        task_id = _add(cli, repo, "from the cli", "true")

        frame = stream.next()

        assert (frame.event, frame.data["kind"], frame.data["task_id"]) == (
            "created",
            "created",
            task_id,
        )
        assert frame.id == frame.data["id"]
        assert frame.data["to_status"] == "ready"
        assert "connected" in stream.comments
    finally:
        stream.close()


def test_a_stream_opened_later_starts_from_now(serve: Serve, cli: Cli, repo: Path) -> None:
    server = serve()
    _add(cli, repo, "before anyone watched", "true")
    time.sleep(1)  # the watcher has moved past it, with nobody listening
    stream = server.stream()
    try:
        later = _add(cli, repo, "while watched", "true")
        frame = stream.next()
        assert (frame.data["task_id"], frame.event) == (later, "created")
    finally:
        stream.close()


def test_a_reconnecting_stream_resumes_right_after_its_last_event(
    serve: Serve, cli: Cli, repo: Path, env: Env
) -> None:
    first = _add(cli, repo, "one", "true")
    second = _add(cli, repo, "two", "true")
    assert cli("cancel", str(first)).code == 0
    server = serve()
    ids = [e["id"] for e in events(env, first) + events(env, second)]
    ids.sort()
    assert len(ids) == 3

    for headers, path in (
        ({"Last-Event-ID": str(ids[0])}, "/api/events"),
        ({}, f"/api/events?after={ids[0]}"),
    ):
        stream = server.stream(path, headers=headers)
        try:
            replayed = [stream.next() for _ in ids[1:]]
            assert [f.id for f in replayed] == ids[1:]
            third = _add(cli, repo, "three", "true")
            live = stream.next()  # the first new one: nothing repeated, nothing skipped
            assert (live.data["task_id"], live.event) == (third, "created")
            ids.append(live.data["id"])
        finally:
            stream.close()


def test_a_client_that_leaves_a_long_replay_leaves_the_server_quiet(
    serve: Serve, cli: Cli, repo: Path, make_app: MakeApp
) -> None:
    """`curl …/api/events?after=0 | head`: the server noticed the closed socket only after
    a write for every event, and asyncio logged each one."""
    task_id = _add(cli, repo, "chatty", "true")

    def notes(tx: Tx) -> None:
        for n in range(3000):
            st.record_event(tx, "note", task_id=task_id, n=n)

    make_app().direct.write(notes)
    server = serve()
    for _ in range(3):
        stream = server.stream("/api/events?after=0")
        assert stream.next().data["task_id"] == task_id
        stream.close()
    time.sleep(1)  # what the server would log, it logs as it writes
    assert server.get("/api/tasks").status == 200
    assert "socket.send() raised exception" not in server.stderr
    assert server.stderr.strip() == "", server.stderr


def test_a_stream_of_one_task_shows_only_it(serve: Serve, cli: Cli, repo: Path) -> None:
    watched = _add(cli, repo, "watched", "true")
    other = _add(cli, repo, "other", "true")
    server = serve()
    stream = server.stream(f"/api/events?task={watched}&after=0")
    try:
        assert stream.next().data["task_id"] == watched  # its `created`, not the other's
        assert cli("cancel", str(other)).code == 0
        assert cli("cancel", str(watched)).code == 0
        frame = stream.next()
        assert (frame.data["task_id"], frame.event) == (watched, "cancelled")
    finally:
        stream.close()
    assert server.get("/api/events?task=99").status == 404
    assert server.get("/api/events?after=soon").status == 400


# -- the periodic sweep ----------------------------------------------------------------------


def test_the_server_sweeps_an_agent_killed_with_sigkill(
    serve: Serve, cli: Cli, repo: Path, env: Env
) -> None:
    task_id = _running(cli, repo)
    attempt = attempts(env, task_id)[-1]
    serve("--sweep-every", "1s")
    signal_quietly(attempt["agent_pid"], signal.SIGKILL)
    signal_quietly(attempt["wrapper_pid"], signal.SIGKILL)
    wait_for(lambda: f"t{task_id}" not in windows(env), "the window to close")

    # Nobody reads or runs `dispatch sweep`: the database itself shows the reap.
    wait_for(lambda: task(env, task_id)["status"] == "interrupted", "the server's sweep")
    assert len(events(env, task_id, "reaped")) == 1


def test_sweep_every_0_never_sweeps_and_the_default_sweeps_at_start(
    serve: Serve, cli: Cli, repo: Path, env: Env
) -> None:
    task_id = _running(cli, repo)
    attempt = attempts(env, task_id)[-1]
    signal_quietly(attempt["agent_pid"], signal.SIGKILL)
    signal_quietly(attempt["wrapper_pid"], signal.SIGKILL)
    wait_for(lambda: f"t{task_id}" not in windows(env), "the window to close")

    idle = serve("--sweep-every", "0")
    assert idle.get("/api/health").status == 200
    time.sleep(1.5)
    assert task(env, task_id)["status"] == "in-progress"  # nobody swept
    assert idle.stop() == 0

    serve()  # the default: a sweep when it starts
    wait_for(lambda: task(env, task_id)["status"] == "interrupted", "the sweep at start")
