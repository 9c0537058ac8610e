"""The two ASGI layers around every request, outside FastAPI's routing:

- `RequestContext`, the request boundary: a request id (in `x-request-id` and every log line),
  the API key check, the in-flight gauge, request counts and latency by route, one access line
  without content, and the last line of defence: an unexpected exception becomes a 500 naming
  the request id, its traceback logged with the message withheld (it may quote patient data).
- `BodySizeLimit`: bodies over the cap get 413, whether they declare their length or stream in.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxrlite.server.errors import APIError, error_body
from cxrlite.server.security import OPEN_PATHS, redacted_traceback, require_api_key

if TYPE_CHECKING:
    from cxrlite.server.metrics import ServerMetrics
    from cxrlite.server.settings import ServerSettings

logger = logging.getLogger(__name__)
access_log = logging.getLogger("cxrlite.server.access")  # one line per request, no content

# The route label of metrics and access lines; any other path counts as "other".
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/reports"}


async def send_json(send: Send, status: int, body: dict, headers: Iterable = ()) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*raw, *headers]})
    await send({"type": "http.response.body", "body": payload})


# --- request size ----------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from `receive` when the body passes the cap. An HTTPException, so FastAPI's body
    parsing passes it on unchanged (it wraps other exceptions into a 400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {max_bytes} bytes")


def _too_large_body(max_bytes: int) -> dict:
    return error_body(BodyTooLarge(max_bytes).detail, "invalid_request_error", "request_too_large")


class BodySizeLimit:
    """Refuses bodies over `max_bytes`: at once from Content-Length, or while a chunked body
    streams in (counted, so a missing or false Content-Length cannot get past)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await send_json(send, 400, error_body("bad Content-Length", "invalid_request_error"))
            return
        if declared is not None and int(declared) > self.max_bytes:
            await send_json(send, 413, _too_large_body(self.max_bytes))
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await send_json(send, 413, _too_large_body(self.max_bytes))


# --- the request boundary --------------------------------------------------------------------


class RequestContext:
    """Request id, API key, in-flight gauge, request counter and latency, the access log line,
    and the 500 of last resort (see the module's docstring)."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id, started = uuid.uuid4().hex[:16], time.perf_counter()
        scope.setdefault("state", {}).update(request_id=request_id, started=started, usage=None)
        status, response_started = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        api = scope["path"].startswith("/v1/")
        if api:
            self.metrics.in_flight.inc()
        try:
            denied = self._denied(scope)
            if denied is not None:
                self.metrics.error(denied.type, denied.code)
                extra = [(k.lower().encode(), v.encode()) for k, v in denied.headers.items()]
                await send_json(send_with_id, denied.status, denied.body(), extra)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - the boundary: nothing escapes to the client
            self._log_failure(request_id, e)
            if not response_started:
                message = f"internal server error (error id {request_id})"
                body = error_body(message, "server_error", "internal_error")
                await send_json(send_with_id, 500, body)
        finally:
            if api:
                self.metrics.in_flight.dec()
            self._account(scope, status, time.perf_counter() - started)

    def _denied(self, scope: Scope) -> APIError | None:
        """The 401 of a request without the API key, if it needs one."""
        if scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return None
        authorization = dict(scope.get("headers") or []).get(b"authorization", b"")
        try:
            require_api_key(authorization.decode("latin-1"), self.settings.api_key)
        except APIError as e:
            return e
        return None

    def _log_failure(self, request_id: str, error: Exception) -> None:
        if self.settings.log_phi:
            detail = "".join(traceback.format_exception(error))
        else:
            detail = redacted_traceback(error)
        logger.error("request %s failed (error id %s): %s", request_id, request_id, detail)
        self.metrics.error("server_error", "internal_error")

    def _account(self, scope: Scope, status: int, elapsed: float) -> None:
        """Count and time the request by route; write its access line (no content)."""
        route = scope["path"] if scope["path"] in ROUTES else "other"
        self.metrics.requests.labels(route, str(status)).inc()
        self.metrics.e2e.labels(route).observe(elapsed)
        usage = scope["state"].get("usage") or {}
        access_log.info(
            "request %s %s %s -> %d in %.1f ms, tokens %s prompt / %s completion",
            scope["state"]["request_id"],
            scope["method"],
            route,
            status,
            elapsed * 1000,
            usage.get("prompt_tokens", "-"),
            usage.get("completion_tokens", "-"),
        )
