"""The Starlette application: routes, the page's files, and the background work
(the shared event watcher, the periodic sweep) that lives as long as the server."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from importlib import resources

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dispatch.app import App
from dispatch.errors import DispatchError
from dispatch.services import monitor
from dispatch.web import api
from dispatch.web.board import BoardJson
from dispatch.web.security import Guard
from dispatch.web.stream import Feed


def _page(name: str) -> bytes:
    return (resources.files("dispatch.web") / "static" / name).read_bytes()


async def index(request: Request) -> Response:
    return Response(_page("index.html"), media_type="text/html; charset=utf-8")


async def task_page(request: Request) -> Response:
    return Response(_page("task.html"), media_type="text/html; charset=utf-8")


async def http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and methods: JSON under /api/, plain text elsewhere."""
    assert isinstance(exc, HTTPException)
    if not request.url.path.startswith("/api/"):
        return Response(exc.detail, status_code=exc.status_code, media_type="text/plain")
    kind = "not-found" if exc.status_code == 404 else "usage"
    code = 4 if exc.status_code == 404 else 2
    message = f"{request.method} {request.url.path}: {exc.detail.lower()}"
    return JSONResponse(
        {"error": {"code": code, "kind": kind, "message": message}}, status_code=exc.status_code
    )


async def _sweep_every(app: App, seconds: float) -> None:
    from dispatch.services.sweep import sweep

    while True:
        try:
            report = await run_in_threadpool(
                sweep, app, dry_run=False, requeue=False, stale_after=app.settings.stale_after
            )
            for problem in report.problems:
                sys.stderr.write(f"dispatch: warning: {problem}\n")
        except Exception as exc:  # the next round may succeed: say so, keep serving
            message = exc.message if isinstance(exc, DispatchError) else repr(exc)
            sys.stderr.write(f"dispatch: warning: sweep: {message}\n")
        await asyncio.sleep(seconds)


def create(
    app: App, *, token: str, hosts: frozenset[str], sweep_every: float, feed: Feed | None = None
) -> Starlette:
    """The monitor over `app`; `feed` is made here unless given (the server keeps it to
    close the streams when it stops)."""
    feed = feed or Feed(
        lambda after, task_id, limit: monitor.events_after(app, after, task_id, limit),
        lambda: monitor.last_event_id(app),
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        await feed.prime()
        background = [asyncio.create_task(feed.run())]
        if sweep_every > 0:
            background.append(asyncio.create_task(_sweep_every(app, sweep_every)))
        try:
            yield
        finally:
            feed.close()
            for job in background:
                job.cancel()
            for job in background:
                with contextlib.suppress(asyncio.CancelledError):
                    await job

    t = "/api/tasks/{task_id}"
    routes = [
        Route("/", index),
        Route("/tasks/{task_id}", task_page),
        Route("/api/health", api.health),
        Route("/api/tasks", api.tasks),
        Route(t, api.task),
        Route(f"{t}/log", api.log),
        Route(f"{t}/diff", api.diff),
        Route(f"{t}/redispatch", api.redispatch, methods=["POST"]),
        Route(f"{t}/cancel", api.cancel, methods=["POST"]),
        Route(f"{t}/reset", api.reset, methods=["POST"]),
        Route("/api/events", api.events),
        Mount("/static", StaticFiles(packages=[("dispatch.web", "static")]), name="static"),
    ]
    web = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, token=token, hosts=hosts)],
        exception_handlers={
            DispatchError: api.dispatch_error,
            HTTPException: http_error,
            Exception: api.unexpected,
        },
        lifespan=lifespan,
    )
    web.state.dispatch = app
    web.state.feed = feed
    web.state.board = BoardJson()
    return web
