"""The app factory: routes, state, middleware and error handlers put together.

    app = create_app(lambda: Runtime.from_bundle("bundle/"), ServerSettings(api_key="..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Everything a route needs is on `app.state`: `settings` (ServerSettings), `metrics`
(ServerMetrics), `loader` (RuntimeLoader: the runtime once ready), `scheduler` (the queue in
front of the LLM workers, one per runtime slot), `image_pool` (the threads that decode and encode images) and
`dicom` (the DICOM listener of `--dicom-port`, cxrlite.pacs, or None).
Logs carry the request id, route, status, timings and token counts only; `log_phi` adds
prompts and answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from cxrlite import __version__
from cxrlite.server.errors import install_error_handlers
from cxrlite.server.loader import RuntimeLoader
from cxrlite.server.metrics import ServerMetrics
from cxrlite.server.middleware import BodySizeLimit, RequestContext
from cxrlite.server.routes import openai, ops, reports
from cxrlite.server.scheduler import Scheduler
from cxrlite.server.settings import ServerSettings


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = app.state
    state.scheduler.start()
    state.loader.start()
    try:
        if state.dicom is not None:
            state.dicom.start()  # after the scheduler: its reports are jobs on the LLM worker
        yield
    finally:
        if state.dicom is not None:
            state.dicom.stop()
        state.scheduler.stop()
        state.image_pool.shutdown(wait=False, cancel_futures=True)
        state.loader.close()


def create_app(
    runtime: Any,
    settings: ServerSettings | None = None,
    *,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The server around a `cxrlite.runtime.Runtime`, or a function that makes one (called in a
    background thread at startup, so /health answers 503 "loading" meanwhile; the app then owns
    the runtime and closes it at shutdown). `on_load_error(exception)` hears of a failed load."""
    settings = settings or ServerSettings()
    app = FastAPI(
        title="cxrlite", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )  # the docs pages load scripts from a CDN
    metrics = ServerMetrics()
    scheduler = Scheduler(
        settings.max_queue, on_start=lambda job: metrics.queue_time.observe(job.queue_s)
    )
    metrics.watch_queue(lambda: scheduler.depth)
    app.state.settings, app.state.metrics, app.state.scheduler = settings, metrics, scheduler
    app.state.loader = RuntimeLoader(
        runtime,
        settings,
        metrics,
        on_load_error,
        # one worker per slot: the runtime's engine decodes their generations together
        on_ready=lambda rt: scheduler.set_workers(getattr(rt.llm, "slots", 1)),
    )
    app.state.image_pool = ThreadPoolExecutor(settings.image_workers, "cxrlite-image")
    app.state.dicom = None
    if settings.dicom is not None:  # `--dicom-port`: PACS in, SR out (cxrlite.pacs.serving)
        from cxrlite.pacs.serving import attach_dicom

        attach_dicom(app)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, settings=settings, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    for module in (ops, openai, reports):
        app.include_router(module.router)
    return app
