"""The operations routes: `GET /health` (200 when ready, 503 while loading or after a failed
load), `GET /metrics` (Prometheus) and `GET /`, the web page (cxrlite/server/static/index.html)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

router = APIRouter()

PAGE = (Path(__file__).parent.parent / "static" / "index.html").read_text(encoding="utf-8")
PAGE_HEADERS = {
    # The page is one file with inline script and style; it talks to this origin only.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@router.get("/", include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    runtime = state.loader.runtime
    if runtime is not None:
        info = {
            "status": "ok",
            "model": runtime.model_id,
            "variants": runtime.variants,
            "queue_depth": state.scheduler.depth,
            "max_queue": state.settings.max_queue,
        }
        return JSONResponse(info)
    if state.loader.error is not None:
        return JSONResponse({"status": "error", "error": state.loader.error}, 503)
    return JSONResponse({"status": "loading"}, 503, headers=state.settings.retry_after)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)
