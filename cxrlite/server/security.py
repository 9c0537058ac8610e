"""What keeps the server safe to run next to patient data: the API key, the image-URL policy
(data URLs, remote hosts only when allowed), exposure warnings and tracebacks without messages.
The request-size cap and the request boundary that applies them are in cxrlite.server.middleware.

Policy, in one place:
- With an API key every route but `/`, `/health` and the static page needs
  `Authorization: Bearer KEY` (compared in constant time); `/metrics` included, since request
  counts and timings describe a hospital's activity (Prometheus sends the key with its
  `authorization: {credentials: KEY}` scrape setting).
- A request body is capped (`max_body_mb`), whether it declares its length or not.
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
import traceback
from collections.abc import Iterable
from urllib.parse import urlsplit

from cxrlite.server.errors import APIError

OPEN_PATHS = {"/", "/health"}  # everything else needs the API key when one is set

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
