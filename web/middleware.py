"""ASGI middleware: security headers and request metrics on every response, a body bound."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from web.metrics import WebMetrics

CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'"
)
# Swagger UI sets inline styles from its stylesheet bundle; its scripts are still files
DOCS_CSP = CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


class Headers:
    """Adds CSP, nosniff and no-referrer to every response and counts it by route."""

    def __init__(self, app: ASGIApp, metrics: WebMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        csp = DOCS_CSP if path.startswith("/docs") else CSP
        started = time.perf_counter()
        status = [500]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                            if k != "content-security-policy"]  # fmt: skip
                headers.append((b"content-security-policy", csp.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = _route_name(scope)
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.seconds.labels(route).observe(time.perf_counter() - started)


def _route_name(scope: Scope) -> str:
    # the route's template, not the path: ids in paths would make unbounded label values
    route: Any = scope.get("route")
    name = getattr(route, "path", None)
    return str(name) if name else "unmatched"


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413, by Content-Length or as it comes,
    and one that has not all arrived `timeout_s` after the headers with 408 (the body is read
    before the token is checked: a client sending a byte a minute must not hold on)."""

    def __init__(self, app: ASGIApp, limit: int, metrics: WebMetrics, timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await self._refuse(send)
                return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                await self._too_slow(send)
                return
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._refuse(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        self.metrics.refused.labels("body_too_large").inc()
        error = f"the request body is larger than {self.limit} bytes (web.max_body_bytes)"
        await _answer(send, 413, error + "; send less")

    async def _too_slow(self, send: Send) -> None:
        self.metrics.refused.labels("slow_request").inc()
        await _answer(send, 408, f"the request body did not arrive within {self.timeout_s:g} s "
                                 "(web.read_timeout_s): send it at once")  # fmt: skip


async def _answer(send: Send, status: int, error: str) -> None:
    body = json.dumps({"error": error}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
