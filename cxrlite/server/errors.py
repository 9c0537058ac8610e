"""Every answer other than 200, in OpenAI's shape `{"error": {"message", "type", "code",
"param"}}` so the `openai` client raises its typed exceptions.

Code anywhere in a request raises; the app renders. Each exception type has exactly one handler
here (`HANDLERS`), which turns it into an `APIError`, counts it by type and code and logs one
line without the request's content: a full queue, a server shutting down, a deadline passed, a
bad image, an invalid body. Error messages never echo the request's text or image (patient
data).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from cxrlite.imaging.errors import ImageError
from cxrlite.server.scheduler import JobTimeout, QueueFull, SchedulerStopped
from cxrlite.server.settings import ServerSettings

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An answer other than 200, raised anywhere in a request and rendered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# The statuses a route may answer besides 200, for the OpenAPI schema.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "Invalid request (schema, prompt, image URL, context length)",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Request body or image too large",
        415: "Not a DICOM, PNG or JPEG image",
        422: "An image without usable pixels, or a DICOM that is not a chest radiograph",
        503: "Queue full, model loading or shutting down (see Retry-After)",
        504: "The request timed out (its generation was cancelled)",
    }.items()
}


# --- the errors of the request pipeline --------------------------------------------------------


def queue_full_error(settings: ServerSettings) -> APIError:
    return APIError(
        503,
        f"the server is busy ({settings.max_queue} requests queued); retry shortly",
        code="queue_full",
        headers=settings.retry_after,
    )


def shutting_down_error() -> APIError:
    return APIError(503, "the server is shutting down", code="shutting_down")


def timeout_error(settings: ServerSettings) -> APIError:
    """The 504 of a request past its deadline; also sent as an event once a stream has begun."""
    return APIError(
        504,
        f"the request took longer than the server's limit of {settings.request_timeout_s:g} s",
        code="timeout",
    )


def image_error(error: ImageError) -> APIError:
    # ImageError messages name the source ("upload") and the problem, never patient data.
    return APIError(error.http_status, str(error), code=error.code, param="image")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    parts = []
    for error in errors[:5]:
        loc = ".".join(str(x) for x in error.get("loc", ()) if x not in ("body", "form"))
        if error.get("type") == "union_tag_invalid":  # pydantic's text quotes the input's tag
            msg = f"unknown type; expected one of {error.get('ctx', {}).get('expected_tags')}"
        else:
            msg = error.get("msg", "invalid value")
        parts.append(f"{loc}: {msg}" if loc else msg)
    first = errors[0].get("loc", ()) if errors else ()
    param = ".".join(str(x) for x in first if x not in ("body", "form")) or None
    return "; ".join(parts), param


def validation_error(error: RequestValidationError) -> APIError:
    message, param = _validation_message(list(error.errors()))
    return APIError(400, message, code="invalid_request", param=param)


def http_error(error: HTTPException) -> APIError:
    codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
    return APIError(
        error.status_code,
        str(error.detail),
        code=codes.get(error.status_code),
        headers=dict(error.headers or {}),
    )


# --- rendering ---------------------------------------------------------------------------------

# exception type -> its APIError, given the exception and the server's settings
HANDLERS: dict[type[Exception], Callable[[Any, ServerSettings], APIError]] = {
    APIError: lambda error, settings: error,
    ImageError: lambda error, settings: image_error(error),
    RequestValidationError: lambda error, settings: validation_error(error),
    HTTPException: lambda error, settings: http_error(error),
    QueueFull: lambda error, settings: queue_full_error(settings),
    SchedulerStopped: lambda error, settings: shutting_down_error(),
    JobTimeout: lambda error, settings: timeout_error(settings),
}


def render(request: Request, error: APIError) -> JSONResponse:
    """The error's response, counted by type and code and logged without the request's text."""
    request.app.state.metrics.error(error.type, error.code)
    logger.info("request %s refused: %d %s", request.state.request_id, error.status, error.code)
    return JSONResponse(error.body(), error.status, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type, to_api_error in HANDLERS.items():

        async def handler(request: Request, exc: Exception, convert=to_api_error) -> JSONResponse:
            return render(request, convert(exc, request.app.state.settings))

        app.add_exception_handler(exc_type, handler)
