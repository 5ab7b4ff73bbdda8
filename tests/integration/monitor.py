"""A real `dispatch serve` in a subprocess, and a plain HTTP client for it."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import Env

URL = re.compile(r"^http://127\.0\.0\.1:(\d+)/#token=([A-Za-z0-9_-]+)$")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]  # type: ignore[no-any-return]


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    port: int
    token: str
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = "",
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> Answer:
        """`token=""` sends the server's own token, None sends none."""
        sent = dict(headers or {})
        if token is not None:
            sent.setdefault("Authorization", f"Bearer {token or self.token}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, headers=sent)
            response = conn.getresponse()
            return Answer(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Answer:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Answer:
        return self.request("POST", path, **kwargs)

    def stream(self, path: str = "/api/events", headers: dict[str, str] | None = None) -> Stream:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        sent = {"Authorization": f"Bearer {self.token}", **(headers or {})}
        conn.request("GET", path, headers=sent)
        response = conn.getresponse()
        return Stream(conn, response)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        return self.proc.wait(timeout=timeout)


@dataclass
class Frame:
    id: int | None
    event: str | None
    data: Any


@dataclass
class Stream:
    """An open event stream, read frame by frame."""

    conn: http.client.HTTPConnection
    response: http.client.HTTPResponse
    comments: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {k.lower(): v for k, v in self.response.getheaders()}

    def next(self) -> Frame:
        """The next event frame (comments are kept aside); fails after the socket timeout."""
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline().decode()
            if line == "":
                raise AssertionError("the event stream ended")
            line = line.rstrip("\n")
            if line == "":
                if "data" in fields:
                    return Frame(
                        int(fields["id"]) if "id" in fields else None,
                        fields.get("event"),
                        json.loads(fields["data"]),
                    )
                continue
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            name, _, value = line.partition(": ")
            fields[name] = value

    def until(self, probe: Callable[[Frame], bool], limit: int = 200) -> list[Frame]:
        """Frames up to and including the first one `probe` accepts."""
        seen = []
        for _ in range(limit):
            seen.append(self.next())
            if probe(seen[-1]):
                return seen
        raise AssertionError(f"no such frame in {limit}: {seen}")

    def close(self) -> None:
        self.conn.close()


def start_server(env: Env, *args: str, path: str | None = None) -> Server:
    """`dispatch serve --port 0 ARGS`, once its first line (the URL) is out."""
    errors = env.root / f"serve-{time.monotonic_ns()}.stderr"
    environ = dict(os.environ)
    if path is not None:
        environ["PATH"] = path
    with errors.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dispatch", "serve", "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=env.root, env=environ,
        )  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline().rstrip("\n") if ready else ""
    match = URL.match(line)
    if match is None:
        proc.kill()
        proc.wait()
        raise AssertionError(f"serve printed {line!r}; stderr: {errors.read_text()}")
    return Server(proc, line, int(match.group(1)), match.group(2), errors)


def serving(env: Env) -> Iterator[Callable[..., Server]]:
    """The body of a test module's `serve` fixture: servers started, then killed."""
    started: list[Server] = []

    def start(*args: str, path: str | None = None) -> Server:
        server = start_server(env, *args, path=path)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        if server.proc.stdout is not None:
            server.proc.stdout.close()
