"""ASGI middleware in front of every route: the API key, the body-size limit, one log line per request and
the request counter. Works on raw ASGI messages, so a streamed response is logged when it has ended.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .metrics import Metrics
from .schema import error_body

log = logging.getLogger("mlx_qwen2.server")

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = {"/health"}  # answered without a key: for load balancers and liveness checks


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int, metrics: Metrics):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status, path = time.monotonic(), [0], scope["path"]
        scope.setdefault("state", {})["log"] = log_fields = {}

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                _log_line(scope, status[0], time.monotonic() - start, log_fields)

        try:
            refusal = self._refuse(scope)
            if refusal is not None:
                await _reply(counted_send, *refusal)
                return
            body = await _read_body(receive, self.max_body_bytes)
            if body is None:
                message = f"the request body is over the server's limit of {self.max_body_bytes} bytes"
                await _reply(counted_send, 413, error_body(message, "invalid_request_error", code="body_too_large"))
                return
            await self.app(scope, _replay(body, receive), counted_send)
        finally:
            route = path if path in _ROUTES else "other"
            self.metrics.requests.labels(route, str(status[0] or 499)).inc()

    def _refuse(self, scope: Scope) -> tuple[int, dict[str, Any]] | None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                message = "a valid API key is required: send the header 'Authorization: Bearer KEY'"
                return 401, error_body(message, "authentication_error", code="invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            message = f"the request body is over the server's limit of {self.max_body_bytes} bytes"
            return 413, error_body(message, "invalid_request_error", code="body_too_large")
        return None


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"}


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once it passes `limit` bytes (whatever Content-Length said)."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the app the body once, then the client's own messages (for disconnects)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _reply(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def _log_line(scope: Scope, status: int, seconds: float, fields: dict[str, Any]) -> None:
    request_id = fields.pop("id", "-")
    extra = " ".join(f"{k}={v}" for k, v in fields.items())
    log.info("%s %s %s %d %.3fs %s", request_id, scope["method"], scope["path"], status, seconds, extra)
