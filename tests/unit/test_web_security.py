"""The monitor's guard on its own: Host check, bearer token, headers; no server needed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import MutableMapping
from typing import Any

import pytest

from dispatch.web.security import Guard, allowed_hosts

TOKEN = "s3cret-token"
HOSTS = allowed_hosts("127.0.0.1", 8765)


def _call(path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], Any, bool]:
    """Status, headers, JSON body (or None) and whether the app behind the guard ran."""
    reached = False

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        nonlocal reached
        reached = True
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http",
        "path": path,
        "method": "GET",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(Guard(inner, token=TOKEN, hosts=HOSTS)(scope, receive, send))
    start, body = sent[0], sent[1]["body"]
    out = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], out, json.loads(body) if body else None, reached


def test_allowed_hosts_are_the_address_and_loopback_names_with_the_port() -> None:
    assert set(HOSTS) == {"127.0.0.1:8765", "localhost:8765", "[::1]:8765"}
    assert "example.org:80" in allowed_hosts("example.org", 80)
    assert "example.org" in allowed_hosts("example.org", 80)  # browsers leave :80 out
    assert "[::1]:9000" in allowed_hosts("::1", 9000)


@pytest.mark.parametrize("host", ["evil.example:8765", "127.0.0.1", "127.0.0.1:9999", ""])
def test_a_foreign_host_is_403_before_anything_runs(host: str) -> None:
    status, _, body, reached = _call(
        "/api/tasks", {"Host": host, "Authorization": f"Bearer {TOKEN}"}
    )
    assert (status, reached) == (403, False)
    assert body["error"]["kind"] == "forbidden"


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x"]
)
def test_api_without_the_right_token_is_401(authorization: str | None) -> None:
    headers = {"Host": "127.0.0.1:8765"}
    if authorization is not None:
        headers["Authorization"] = authorization
    status, out, body, reached = _call("/api/tasks", headers)
    assert (status, reached) == (401, False)
    assert body["error"]["kind"] == "unauthorized"
    assert out["www-authenticate"].startswith("Bearer")


def test_health_and_pages_need_no_token_but_the_right_host() -> None:
    for path in ("/api/health", "/", "/tasks/3", "/static/style.css"):
        status, _, _, reached = _call(path, {"Host": "localhost:8765"})
        assert (status, reached) == (200, True), path


def test_the_token_opens_the_api_and_answers_carry_no_cors_or_cookie() -> None:
    status, out, _, reached = _call(
        "/api/tasks",
        {"Host": "127.0.0.1:8765", "Authorization": f"bearer {TOKEN}", "Origin": "http://x.test"},
    )
    assert (status, reached) == (200, True)
    assert not [k for k in out if k.startswith("access-control-") or k == "set-cookie"]
    assert out["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in out["content-security-policy"]
