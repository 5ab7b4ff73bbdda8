"""Who may talk to the monitor: one ASGI middleware for the Host check and the token.

The Host check stops DNS rebinding (a foreign page whose name resolves to 127.0.0.1);
the token, compared in constant time, stops every other local page and process.
Nothing here sets a cookie or a CORS header: a page on another origin can neither
read an answer nor send a request with the token.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

OPEN_PATHS = frozenset({"/api/health"})
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")

# Pages and answers are never framed, sniffed, cached or followed by a referrer.
_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    ),
]


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values a browser sends for this server: its address or a loopback
    name, with the port (and without it when the port is the default one)."""
    bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = {bound.lower(), *LOOPBACK_NAMES}
    values = {f"{name}:{port}" for name in names}
    if port == 80:
        values |= names
    return frozenset(values)


class Guard:
    """Refuses a foreign Host (403) and, under /api/ but health, a missing token (401)."""

    def __init__(self, app: ASGIApp, *, token: str, hosts: Iterable[str]) -> None:
        self.app = app
        self.token = token.encode()
        self.hosts = frozenset(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1").lower()
        path: str = scope["path"]
        if host not in self.hosts:
            await _refuse(send, 403, "forbidden", f"Host {host!r} is not this server's address")
            return
        if path.startswith("/api/") and path not in OPEN_PATHS and not self._authorised(headers):
            await _refuse(
                send, 401, "unauthorized", "missing or wrong token; open the URL `serve` printed"
            )
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                own = list(message.get("headers", []))
                present = {name.lower() for name, _ in own}
                message["headers"] = own + [h for h in _HEADERS if h[0] not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        return hmac.compare_digest(given.strip(), self.token)


async def _refuse(send: Send, status: int, kind: str, message: str) -> None:
    # Code 2, as for any request the CLI would refuse before doing anything.
    body = json.dumps({"error": {"code": 2, "kind": kind, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *_HEADERS,
    ]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="dispatch"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
