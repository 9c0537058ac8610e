"""What keeps the server safe to run next to patient data: the API key, the request-size cap,
the image-URL policy (data URLs, remote hosts only when allowed), exposure warnings, and the
request boundary (`RequestContext`: request ids, PHI-free access lines, and unexpected errors
turned into a 500 whose logged traceback has its message withheld).

Policy, in one place:
- With an API key every route but `/`, `/health` and the static page needs
  `Authorization: Bearer KEY` (compared in constant time); `/metrics` included, since request
  counts and timings describe a hospital's activity (Prometheus sends the key with its
  `authorization: {credentials: KEY}` scrape setting).
- Images come as data URLs (PNG, JPEG, DICOM). An http(s) URL is fetched only when its host is
  allowed (`--allow-image-host`), without following redirects (a redirect could lead anywhere),
  with a timeout and the same size cap as a request body. Other schemes are refused.
- Neither a URL nor a file name is echoed in errors or logs: both can carry patient names.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import logging
import time
import traceback
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxrlite.server.schemas import APIError, error_body

if TYPE_CHECKING:
    from cxrlite.server.app import ServerSettings
    from cxrlite.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
access_log = logging.getLogger("cxrlite.server.access")  # one line per request, no content

OPEN_PATHS = {"/", "/health"}  # everything else needs the API key when one is set
ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/reports"}

DATA_URL_TYPES = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/dicom": "dicom",
}
REMOTE_SCHEMES = ("http", "https")


# --- API key ---------------------------------------------------------------------------------


def bearer_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an `Authorization` header carries `Bearer api_key` (constant-time compare)."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def require_api_key(authorization: str | None, api_key: str | None) -> None:
    if api_key and not bearer_matches(authorization, api_key):
        raise APIError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server listens beyond this machine without an API key."""
    if api_key or is_loopback(host):
        return None
    return (
        f"listening on {host} without an API key: anyone who can reach this machine can use "
        "the model; set --api-key or CXRLITE_API_KEY"
    )


# --- request size ----------------------------------------------------------------------------


class BodyTooLarge(HTTPException):
    """Raised from `receive` when the body passes the cap. An HTTPException, so FastAPI's body
    parsing passes it on unchanged (it wraps other exceptions into a 400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body exceeds the limit of {max_bytes} bytes")


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
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            status = 413 if declared.isdigit() else 400
            message = BodyTooLarge(self.max_bytes).detail if status == 413 else "bad Content-Length"
            await send_json(
                send,
                status,
                error_body(
                    message, "invalid_request_error", "request_too_large" if status == 413 else None
                ),
            )
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
        except BodyTooLarge as e:
            if started:
                raise
            body = error_body(str(e.detail), "invalid_request_error", "request_too_large")
            await send_json(send, 413, body)


async def send_json(send: Send, status: int, body: dict, headers: Iterable = ()) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*raw, *headers]})
    await send({"type": "http.response.body", "body": payload})


# --- images from URLs ------------------------------------------------------------------------


def decode_data_url(url: str) -> bytes:
    """The bytes of a base64 `data:` URL of a PNG, JPEG or DICOM; APIError 400 otherwise."""
    header, comma, data = url.partition(",")
    params = header[len("data:") :].split(";")
    mime = params[0].strip().lower()
    if not comma or mime not in DATA_URL_TYPES:
        raise APIError(
            400,
            f"image data URLs must be one of {', '.join(sorted(DATA_URL_TYPES))}",
            code="unsupported_image_type",
        )
    if "base64" not in (p.strip().lower() for p in params[1:]):
        raise APIError(
            400, "image data URLs must be base64 (data:<type>;base64,...)", code="invalid_image_url"
        )
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, "the image data URL is not valid base64", code="invalid_base64"
        ) from None
    if not raw:
        raise APIError(400, "the image data URL is empty", code="invalid_image_url")
    return raw


def allowed_remote_host(url: str, allowed_hosts: Iterable[str]) -> bool:
    parts = urlsplit(url)
    allowed = {h.lower() for h in allowed_hosts}
    return parts.scheme.lower() in REMOTE_SCHEMES and (parts.hostname or "").lower() in allowed


async def fetch_image(url: str, timeout_s: float, max_bytes: int) -> bytes:
    """GET an allowed remote image without following redirects, at most `max_bytes`."""
    import httpx

    try:
        async with (
            httpx.AsyncClient(timeout=timeout_s, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            if response.status_code != 200:
                raise APIError(
                    400,
                    f"fetching the image failed: HTTP {response.status_code}",
                    code="image_fetch_failed",
                )
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(
                        413,
                        f"the image exceeds the limit of {max_bytes} bytes",
                        code="image_too_large",
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise APIError(
            400, f"fetching the image failed ({type(e).__name__})", code="image_fetch_failed"
        ) from None


async def image_bytes(
    url: str, allowed_hosts: Iterable[str], timeout_s: float, max_bytes: int
) -> bytes:
    """The bytes behind an image_url part, by the policy in this module's docstring."""
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url)
    if scheme in REMOTE_SCHEMES:
        if not allowed_remote_host(url, allowed_hosts):
            raise APIError(
                400,
                "remote image URLs are refused unless the server allows their "
                "host (--allow-image-host); send the image as a data URL",
                code="image_url_not_allowed",
            )
        return await fetch_image(url, timeout_s, max_bytes)
    raise APIError(
        400,
        "image_url must be a base64 data URL (or an allowed http(s) URL)",
        code="invalid_image_url",
    )


# --- logs ------------------------------------------------------------------------------------


def redacted_traceback(exc: BaseException) -> str:
    """The traceback's frames and the exception's type, its message withheld: messages can
    quote the data that caused them (a prompt, a DICOM value)."""
    frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return f"Traceback (most recent call last):\n{frames}{name}: <message withheld>"


# --- the request boundary --------------------------------------------------------------


class RequestContext:
    """Request id, API key, in-flight gauge, request counter and latency, the access log line,
    and the last line of defence: an unexpected exception becomes a 500 with the request id,
    its traceback logged with the message withheld (it may quote patient data)."""

    def __init__(self, app: ASGIApp, settings: ServerSettings, metrics: ServerMetrics) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings, metrics = self.settings, self.metrics
        request_id, started = uuid.uuid4().hex[:16], time.perf_counter()
        scope.setdefault("state", {}).update(request_id=request_id, started=started, usage=None)
        path = scope["path"]
        route = path if path in ROUTES else "other"
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

        api = path.startswith("/v1/")
        if api:
            metrics.in_flight.inc()
        try:
            denied = None
            if path not in OPEN_PATHS and scope["method"] != "OPTIONS":
                headers = dict(scope.get("headers") or [])
                try:
                    require_api_key(
                        headers.get(b"authorization", b"").decode("latin-1"), settings.api_key
                    )
                except APIError as e:
                    denied = e
            if denied is not None:
                metrics.error(denied.type, denied.code)
                extra = [(k.lower().encode(), v.encode()) for k, v in denied.headers.items()]
                await send_json(send_with_id, denied.status, denied.body(), extra)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - the boundary: nothing escapes to the client
            detail = (
                "".join(traceback.format_exception(e))
                if settings.log_phi
                else (redacted_traceback(e))
            )
            logger.error("request %s failed (error id %s): %s", request_id, request_id, detail)
            metrics.error("server_error", "internal_error")
            if not response_started:
                body = error_body(
                    f"internal server error (error id {request_id})",
                    "server_error",
                    "internal_error",
                )
                await send_json(send_with_id, 500, body)
        finally:
            if api:
                metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            metrics.requests.labels(route, str(status)).inc()
            metrics.e2e.labels(route).observe(elapsed)
            usage = scope["state"].get("usage") or {}
            access_log.info(
                "request %s %s %s -> %d in %.1f ms, tokens %s prompt / %s completion",
                request_id,
                scope["method"],
                route,
                status,
                elapsed * 1000,
                usage.get("prompt_tokens", "-"),
                usage.get("completion_tokens", "-"),
            )
