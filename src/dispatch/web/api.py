"""The JSON API: parse the request, call the service the CLI calls, answer its JSON.

Every service call runs in a worker thread: a redispatch saga, a cancel's grace
period or a git diff takes seconds, and the event loop must keep answering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dispatch import __version__
from dispatch.app import App
from dispatch.errors import DispatchError, UsageError
from dispatch.shapes import dispatch_result_json, task_detail_json, task_json
from dispatch.web.board import BoardJson
from dispatch.web.stream import Feed

T = TypeVar("T")

# The CLI's exit code -> the HTTP status of the same refusal.
STATUS_OF_CODE = {1: 500, 2: 400, 3: 409, 4: 404, 5: 410, 6: 500, 7: 503}


def error_response(exc: DispatchError) -> JSONResponse:
    message = exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    return JSONResponse(
        {"error": {"code": exc.exit_code, "kind": exc.kind, "message": message}},
        status_code=STATUS_OF_CODE.get(exc.exit_code, 500),
    )


def _app(request: Request) -> App:
    app: App = request.app.state.dispatch
    return app


async def call(work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await run_in_threadpool(work, *args, **kwargs)


def _int(name: str, value: str | None, *, minimum: int = 0) -> int | None:
    if value is None or value == "":
        return None
    # ASCII digits only (int() takes "²" and "٣" too) and short enough for SQLite's integers.
    if not (value.isascii() and value.isdigit() and len(value) <= 18) or int(value) < minimum:
        raise UsageError(f"{name} must be a whole number of at least {minimum}, not {value!r}")
    return int(value)


def _task_id(request: Request) -> int:
    task_id = _int("the task id", request.path_params["task_id"], minimum=1)
    assert task_id is not None
    return task_id


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True, "version": __version__})


async def tasks(request: Request) -> Response:
    statuses = request.query_params.getlist("status")
    include_closed = request.query_params.get("all", "") not in ("", "0", "false")
    app = _app(request)
    board: BoardJson = request.app.state.board

    def render() -> bytes:
        # Thousands of rows: read and encoded in the worker thread too, not on the loop.
        return board.answer(app, statuses, include_closed)

    return Response(await call(render), media_type="application/json")


async def task(request: Request) -> Response:
    from dispatch.services.tasks import show_task

    view = await call(show_task, _app(request), _task_id(request))
    return JSONResponse(task_detail_json(view))


async def log(request: Request) -> Response:
    from dispatch.services.monitor import log_tail

    task_id = _task_id(request)
    number = _int("attempt", request.query_params.get("attempt"), minimum=1)
    tail = _int("tail", request.query_params.get("tail"))
    body = await call(log_tail, _app(request), task_id, number, tail)
    return Response(body, media_type="text/plain; charset=utf-8")


async def diff(request: Request) -> Response:
    from dispatch.services.monitor import task_diff

    text = await call(task_diff, _app(request), _task_id(request))
    # git passes file contents through as they are: never fail on a byte that is not UTF-8.
    return Response(text.encode("utf-8", "replace"), media_type="text/plain; charset=utf-8")


def _expected_attempt(request: Request) -> int | None:
    """The attempt the page last saw: each action checks it in its own transaction."""
    return _int("expected_attempt", request.query_params.get("expected_attempt"))


async def redispatch(request: Request) -> Response:
    from dispatch.services.dispatching import redispatch as redispatch_service

    task_id = _task_id(request)
    expected = _expected_attempt(request)
    result = await call(redispatch_service, _app(request), task_id, expected_attempt=expected)
    body = {"task_id": result.task.id, "attempt_id": result.attempt.id}
    body.update(dispatch_result_json(result))
    return JSONResponse(body, status_code=202)


async def cancel(request: Request) -> Response:
    from dispatch.services.control import cancel_task

    task_id = _task_id(request)
    expected = _expected_attempt(request)
    view = await call(cancel_task, _app(request), task_id, expected_attempt=expected)
    return JSONResponse({"task": task_json(view.task), "notices": view.notices})


async def reset(request: Request) -> Response:
    from dispatch.services.tasks import reset_task

    task_id = _task_id(request)
    expected = _expected_attempt(request)
    row = await call(reset_task, _app(request), task_id, expected_attempt=expected)
    return JSONResponse({"task": task_json(row), "notices": []})


async def events(request: Request) -> Response:
    params = request.query_params
    task_id = _int("task", params.get("task"), minimum=1)
    resume = request.headers.get("last-event-id") or params.get("after")
    after = _int("Last-Event-ID", resume)
    if task_id is not None:
        from dispatch.services.tasks import show_task

        await call(show_task, _app(request), task_id)  # 404 before the stream starts
    feed: Feed = request.app.state.feed
    return StreamingResponse(
        feed.frames(after, task_id),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def dispatch_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, DispatchError)
    return error_response(exc)


async def unexpected(request: Request, exc: Exception) -> Response:
    """A bug: one line to the page. Starlette raises the exception on after this answer,
    and uvicorn prints its traceback on the server's stderr, once."""
    return error_response(DispatchError(f"{type(exc).__name__}: {exc}"))
