"""Running the monitor: bind, announce the URL once connections are accepted, serve
until SIGINT or SIGTERM, and stop with exit 0."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn

from dispatch.app import App
from dispatch.errors import EnvironmentProblem, UsageError
from dispatch.services import monitor
from dispatch.web import app as web_app
from dispatch.web.security import allowed_hosts
from dispatch.web.stream import Feed
from dispatch.web.token import load_or_create


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise EnvironmentProblem(
                f"port {port} on {host} is in use",
                hint="pick another with --port (0: any free one)",
            ) from None
        raise EnvironmentProblem(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, started: Callable[[], None], feed: Feed) -> None:
        super().__init__(config)
        self._announce = started
        self._feed = feed
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            self._announce()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Stopping is what was asked: unlike uvicorn's own handler, the signal is not
        # raised again after the shutdown, so the process exits 0.
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True
        if self._loop is not None:
            # Open event streams would hold the shutdown: end them.
            self._loop.call_soon_threadsafe(self._feed.close)


def serve(
    app: App,
    *,
    host: str,
    port: int,
    sweep_every: float,
    new_token: bool,
    on_url: Callable[[str], None],
) -> None:
    if not is_loopback(host):
        sys.stderr.write(
            f"dispatch: warning: serving on {host}, not a loopback address: anyone who can "
            "reach it and has the token can run and cancel agents\n"
        )
    # The database is opened (created, migrated or refused) here, where a problem is one
    # line and exit 7, not a traceback from inside the server's start-up.
    monitor.last_event_id(app)
    token = load_or_create(app.settings.home, renew=new_token)
    sock = bind(host, port)
    real_port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    feed = Feed(
        lambda after, task_id, limit: monitor.events_after(app, after, task_id, limit),
        lambda: monitor.last_event_id(app),
    )
    web = web_app.create(
        app,
        token=token,
        hosts=allowed_hosts(host, real_port),
        sweep_every=sweep_every,
        feed=feed,
    )
    config = uvicorn.Config(
        web,
        log_level="warning",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=3,
        server_header=False,
    )
    server = _Server(config, lambda: on_url(f"http://{shown}:{real_port}/#token={token}"), feed)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise EnvironmentProblem(f"the monitor did not start on {shown}:{real_port}")
