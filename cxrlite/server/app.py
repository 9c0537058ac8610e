"""The FastAPI app: OpenAI-compatible chat completions, radiology reports, health, metrics, a page.

    app = create_app(lambda: Runtime.from_bundle("bundle/"), ServerSettings(api_key="..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `POST /v1/chat/completions` (JSON, `stream` for SSE), `GET /v1/models`,
`POST /v1/reports` (multipart `file`), `GET /health`, `GET /metrics`, `GET /` (the page).

A request's life: the middleware gives it an id and a start time and checks the API key; the
route validates it, takes a place in the queue (503 when full), decodes and encodes its image in
the image thread pool (the prompt's length is checked first: it costs nothing), then hands the
generation to the one LLM worker and relays its tokens. The deadline (`request_timeout_s`)
covers it all: past it the job is cancelled and the answer is 504. Logs carry the request id,
route, status, timings and token counts only; `log_phi` adds prompts and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware

from cxrlite import __version__
from cxrlite.imaging.decode import DEFAULT_MAX_PIXELS, load_image
from cxrlite.imaging.errors import ImageError
from cxrlite.server.metrics import ServerMetrics
from cxrlite.server.scheduler import Job, JobTimeout, QueueFull, Scheduler, SchedulerStopped
from cxrlite.server.schemas import (
    ERROR_RESPONSES,
    APIError,
    ChatCompletionRequest,
    ChatPrompt,
    chat_prompt,
    chunk_body,
    completion_body,
    error_body,
    install_error_handlers,
    openai_usage,
)
from cxrlite.server.security import (
    BodySizeLimit,
    RequestContext,
    decode_data_url,
    image_bytes,
    redacted_traceback,
)

logger = logging.getLogger(__name__)

INDEX_HTML = Path(__file__).with_name("static") / "index.html"
PAGE_HEADERS = {
    # The page is one file with inline script and style; it talks to this origin only.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src data: blob:; connect-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_queue: int = 16  # requests admitted and waiting (image work included); more get 503
    request_timeout_s: float = 300.0  # request received -> answer complete, else 504
    max_tokens_cap: int = 512  # no request generates more (and max_tokens defaults to it)
    max_body_mb: float = 64.0  # a DICOM radiograph is up to ~50 MB; base64 adds a third
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_image_hosts: tuple[str, ...] = ()
    image_fetch_timeout_s: float = 10.0
    cors_origins: tuple[str, ...] = ()
    log_phi: bool = False
    image_workers: int = 2
    retry_after_s: int = 2
    report_max_tokens: int = 128

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_tokens_cap", "image_workers", "report_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "max_body_mb", "image_fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


@dataclass
class Prepared:
    generation: Any  # cxrlite.runtime.Generation, not started
    image_decode_ms: float


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


class ServerState:
    """The runtime (loaded in the background), the queue, the image threads and the metrics."""

    def __init__(self, source: Any, settings: ServerSettings) -> None:
        self.settings = settings
        self.factory: Callable[[], Any] | None = source if callable(source) else None
        self.runtime: Any = None if self.factory else source
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self.scheduler = Scheduler(settings.max_queue, on_start=self._on_start)
        self.metrics.watch_queue(lambda: self.scheduler.depth)
        self.image_pool = ThreadPoolExecutor(settings.image_workers, "cxrlite-image")
        self.loaded_at = int(time.time())
        self.loader: threading.Thread | None = None
        self._closing = False

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.scheduler.start()
        if self.factory is None:
            self.metrics.ready.set(1)
        else:
            self.loader = threading.Thread(target=self._load, name="cxrlite-load", daemon=True)
            self.loader.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            runtime = self.factory()  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - reported by /health, the server stays up
            self.load_error = f"{type(e).__name__}: {e}"
            logger.error("loading the model failed: %s", self.load_error)
            return
        if self._closing:
            runtime.close()
            return
        _warm_decoders()
        self.runtime, self.loaded_at = runtime, int(time.time())
        self.metrics.ready.set(1)
        logger.info("model %s ready in %.1f s", runtime.model_id, time.perf_counter() - started)

    def stop(self) -> None:
        self._closing = True
        self.scheduler.stop()
        self.image_pool.shutdown(wait=False, cancel_futures=True)
        if self.factory is not None and self.runtime is not None:
            self.runtime.close()  # the app made it, so the app closes it

    def ready_runtime(self) -> Any:
        if self.runtime is not None:
            return self.runtime
        if self.load_error is not None:
            raise APIError(503, "the model failed to load; see /health", code="model_load_failed")
        raise APIError(
            503,
            "the model is loading; retry shortly",
            code="model_loading",
            headers={"Retry-After": str(self.settings.retry_after_s)},
        )

    # --- queue and threads ---------------------------------------------------------------------

    def _on_start(self, job: Job) -> None:
        self.metrics.queue_time.observe(job.queue_s)

    def admit(self) -> Any:
        try:
            return self.scheduler.admit()
        except QueueFull:
            raise APIError(
                503,
                f"the server is busy ({self.settings.max_queue} requests queued); retry shortly",
                code="queue_full",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            ) from None
        except SchedulerStopped:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None

    async def in_image_pool(self, fn: Callable[..., Any], *args: Any, deadline: float) -> Any:
        future = asyncio.get_running_loop().run_in_executor(self.image_pool, fn, *args)
        try:
            return await asyncio.wait_for(future, max(0.0, deadline - time.perf_counter()))
        except TimeoutError:
            raise self.timeout_error() from None

    def timeout_error(self) -> APIError:
        return APIError(
            504,
            f"the request took longer than the server's limit of "
            f"{self.settings.request_timeout_s:g} s",
            code="timeout",
        )

    async def run_job(self, request: Request, job: Job, deadline: float) -> Any:
        """Wait for a job that emits nothing worth relaying; cancel it if the client leaves."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            async for _ in job.events(deadline):
                pass
        except JobTimeout:
            raise self.timeout_error() from None
        except SchedulerStopped:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        finally:
            watcher.cancel()
        return job.result

    # --- images and prompts --------------------------------------------------------------------

    async def image_source(self, url: str | None, deadline: float) -> str | bytes | None:
        """A data URL as is (decoded later, off the event loop), a remote image's bytes."""
        if url is None or url[:5].lower() == "data:":
            return url
        s = self.settings
        remaining = max(0.0, deadline - time.perf_counter())
        timeout = min(s.image_fetch_timeout_s, remaining)
        return await image_bytes(url, s.allow_image_hosts, timeout, s.max_body_bytes)

    def encode_image(self, runtime: Any, source: str | bytes) -> Any:
        """A data URL's or an upload's embeddings: a file sent before skips decoding (the
        runtime's cache knows its bytes); a new one is decoded under the pixel cap first."""
        raw = decode_data_url(source) if isinstance(source, str) else source
        file_key = runtime.file_key(raw)
        found = runtime.lookup_file(file_key)
        if found is not None:
            return found
        # "upload", never a file name or URL: those can carry patient names.
        image = load_image(raw, name="upload", max_pixels=self.settings.max_pixels)
        return runtime.image_embeddings(image, file_key=file_key)

    def prepare_generation(
        self, runtime: Any, prompt: ChatPrompt, source: str | bytes | None, kwargs: dict
    ) -> Prepared:
        """Check the prompt, decode the image, encode it (vision tower or cache). Image thread."""
        with_image = source is not None
        try:
            ids = runtime.prompt_ids(prompt.messages, with_image=with_image)
        except ValueError as e:  # e.g. "<image>" typed into the text
            raise APIError(400, str(e), code="invalid_prompt", param="messages") from None
        n_image = runtime.config.n_image_tokens if with_image else 0
        n_prompt = len(ids) - int(with_image) + n_image
        if n_prompt >= runtime.llm.n_ctx:
            raise APIError(
                400,
                f"the prompt takes {n_prompt} tokens ({n_prompt - n_image} text, "
                f"{n_image} image); this model's context holds {runtime.llm.n_ctx}, "
                "including the answer",
                code="context_length_exceeded",
                param="messages",
            )
        started = time.perf_counter()
        image = self.encode_image(runtime, source) if source is not None else None
        elapsed_ms = _ms(time.perf_counter() - started)
        decode_ms = elapsed_ms - (image.preprocess_ms + image.vision_ms) if image else 0.0
        try:
            generation = runtime.generate(prompt.messages, image, **kwargs)
        except ImageError:
            raise
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_request") from None
        return Prepared(generation, decode_ms)

    # --- generations ---------------------------------------------------------------------------

    def stream_work(self, job: Job) -> Any:
        """The worker's side of a generation: relay every event, time the tokens."""
        last = None
        with job.generation as generation:
            for event in generation:
                if event.token_id is not None:
                    now = time.perf_counter()
                    if last is None:
                        job.first_token_at = now
                    else:
                        self.metrics.inter_token.observe(now - last)
                    last = now
                job.emit(event)
        result = generation.result
        self.metrics.generation_done(result.finish_reason, result.usage)
        return result

    def finish(self, request: Request, job: Job, prepared: Prepared, result: Any) -> dict:
        """Record the metrics of a finished generation; its timings for the response."""
        started = request.state.started
        t = result.timings
        if job.first_token_at:
            self.metrics.ttft.observe(job.first_token_at - started)
        vision_s = prepared.image_decode_ms + t.get("preprocess_ms", 0) + t.get("vision_ms", 0)
        self.metrics.image_lookup(result.cache_hit, vision_s / 1000.0)
        request.state.usage = result.usage
        if self.settings.log_phi:
            logger.info("request %s answer: %r", request.state.request_id, result.text)
        return {
            "queue_ms": _ms(job.queue_s),
            "image_decode_ms": prepared.image_decode_ms,
            "preprocess_ms": t.get("preprocess_ms", 0.0),
            "vision_ms": t.get("vision_ms", 0.0),
            "prefill_ms": t.get("prefill_ms", 0.0),
            "ttft_ms": _ms(job.first_token_at - started) if job.first_token_at else None,
            "decode_ms": t.get("decode_ms", 0.0),
            "tokens_per_s": t.get("tokens_per_s", 0.0),
            "total_ms": _ms(time.perf_counter() - started),
        }


def _warm_decoders() -> None:
    """Decode a tiny PNG and DICOM once: the first decode of each format imports its plugins
    (~0.2 s), which would otherwise land on the first user's request."""
    import numpy as np

    from cxrlite.imaging.write import dicom_bytes, png_bytes

    gradient = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))
    for data in (png_bytes(gradient), dicom_bytes(gradient)):
        load_image(data, name="warm-up")


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


# --- the app ---------------------------------------------------------------------------------


def create_app(runtime: Any, settings: ServerSettings | None = None) -> FastAPI:
    """The server around a `cxrlite.runtime.Runtime`, or a function that makes one (called in a
    background thread at startup, so /health answers 503 "loading" meanwhile; the app then owns
    the runtime and closes it at shutdown)."""
    settings = settings or ServerSettings()
    state = ServerState(runtime, settings)
    page = INDEX_HTML.read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(
        title="cxrlite", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None
    )  # the docs pages load scripts from a CDN
    app.state.server = state
    install_error_handlers(app, state.metrics)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, settings=settings, metrics=state.metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers=PAGE_HEADERS)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.runtime is not None:
            info = {
                "status": "ok",
                "model": state.runtime.model_id,
                "variants": state.runtime.variants,
                "queue_depth": state.scheduler.depth,
                "max_queue": settings.max_queue,
            }
            return JSONResponse(info)
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, 503)
        return JSONResponse(
            {"status": "loading"}, 503, headers={"Retry-After": str(settings.retry_after_s)}
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        runtime = state.ready_runtime()
        bundle = runtime.bundle
        return {
            "object": "list",
            "data": [
                {
                    "id": runtime.model_id,
                    "object": "model",
                    "created": state.loaded_at,
                    "owned_by": "cxrlite",
                    "variants": runtime.variants,
                    "n_ctx": runtime.llm.n_ctx,
                    "available_variants": {
                        "vision": sorted(bundle.vision_variants),
                        "llm": sorted(bundle.llm_variants),
                    },
                }
            ],
        }

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        runtime = state.ready_runtime()
        if body.model != runtime.model_id:
            raise APIError(
                404,
                f"the requested model does not exist; this server serves '{runtime.model_id}'",
                code="model_not_found",
                param="model",
            )
        prompt = chat_prompt(body)
        kwargs = {
            "max_tokens": min(
                body.requested_max_tokens() or settings.max_tokens_cap, settings.max_tokens_cap
            ),
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "seed": body.seed,
            "stop": body.stop_strings(),
        }
        if settings.log_phi:
            logger.info(
                "request %s messages: %s",
                request.state.request_id,
                json.dumps(prompt.messages, ensure_ascii=False),
            )
        deadline = request.state.started + settings.request_timeout_s
        ticket = state.admit()
        try:
            source = await state.image_source(prompt.image_url, deadline)
            if source is None:
                # Text only: tokenizing takes tens of microseconds, less than the two thread
                # handoffs of the image pool would add to the time to first token.
                prepared = state.prepare_generation(runtime, prompt, None, kwargs)
            else:
                prepared = await state.in_image_pool(
                    state.prepare_generation, runtime, prompt, source, kwargs, deadline=deadline
                )
            job = state.scheduler.submit(
                ticket, Job(state.stream_work, asyncio.get_running_loop(), prepared.generation)
            )
        except SchedulerStopped:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        finally:
            ticket.release()
        completion_id = f"chatcmpl-{request.state.request_id}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(
                request,
                state,
                job,
                prepared,
                deadline,
                completion_id,
                runtime.model_id,
                include_usage,
            )
        result = await state.run_job(request, job, deadline)
        timings = state.finish(request, job, prepared, result)
        return JSONResponse(
            completion_body(
                completion_id,
                runtime.model_id,
                result.text,
                result.finish_reason,
                openai_usage(result.usage, result.timings),
                timings,
                result.cache_hit,
            )
        )

    @app.post("/v1/reports", responses=ERROR_RESPONSES)
    async def reports(
        request: Request,
        file: Annotated[UploadFile, File(description="A DICOM, PNG or JPEG radiograph.")],
        max_tokens: Annotated[int | None, Form(gt=0)] = None,
    ) -> JSONResponse:
        runtime = state.ready_runtime()
        max_tokens = min(max_tokens or settings.report_max_tokens, settings.max_tokens_cap)
        deadline = request.state.started + settings.request_timeout_s
        ticket = state.admit()
        try:
            raw = await file.read()
            if not raw:
                raise APIError(400, "the uploaded file is empty", code="empty_file", param="file")
            embedded = await state.in_image_pool(
                state.encode_image, runtime, raw, deadline=deadline
            )
            job = state.scheduler.submit(
                ticket,
                Job(
                    # the job's cancel event stops the report between any two tokens
                    lambda job: runtime.report(
                        embedded, max_tokens=max_tokens, cancelled=job.cancel_requested
                    ),
                    asyncio.get_running_loop(),
                ),
            )
        finally:
            ticket.release()
        result = await state.run_job(request, job, deadline)
        result["timings"].update(
            queue_ms=_ms(job.queue_s),
            request_ms=_ms(time.perf_counter() - request.state.started),
        )
        state.metrics.image_lookup(
            embedded.cache_hit, (embedded.preprocess_ms + embedded.vision_ms) / 1000
        )
        state.metrics.prompt_tokens.inc(result["usage"]["prompt_tokens"])
        state.metrics.generated_tokens.inc(result["usage"]["completion_tokens"])
        request.state.usage = result["usage"]
        return JSONResponse(
            {
                "id": f"report-{request.state.request_id}",
                "object": "report",
                "model": runtime.model_id,
                **result,
            }
        )

    return app


async def _stream(
    request: Request,
    state: ServerState,
    job: Job,
    prepared: Prepared,
    deadline: float,
    completion_id: str,
    model: str,
    include_usage: bool,
) -> StreamingResponse:
    """SSE chunks as OpenAI sends them. The first token is awaited before the response starts,
    so a request that times out in the queue still gets a 504 status; later failures arrive as
    an `error` event. A client that disconnects cancels its generation."""
    events = job.events(deadline)
    try:
        first = await anext(events)
    except JobTimeout:
        raise state.timeout_error() from None
    except SchedulerStopped:
        raise APIError(503, "the server is shutting down", code="shutting_down") from None
    created = int(time.time())

    async def body() -> AsyncIterator[bytes]:
        completed = False
        try:
            yield _sse(
                chunk_body(completion_id, model, created, {"role": "assistant", "content": ""})
            )
            event = first
            while True:
                if event.text:
                    yield _sse(chunk_body(completion_id, model, created, {"content": event.text}))
                if event.token_id is None:
                    break
                event = await anext(events)
            result = job.generation.result  # set before the final event was emitted
            timings = state.finish(request, job, prepared, result)
            yield _sse(
                chunk_body(
                    completion_id,
                    model,
                    created,
                    {},
                    result.finish_reason,
                    timings=timings,
                    cache_hit=result.cache_hit,
                )
            )
            if include_usage:
                yield _sse(
                    chunk_body(
                        completion_id,
                        model,
                        created,
                        None,
                        usage=openai_usage(result.usage, result.timings),
                    )
                )
            yield _sse("[DONE]")
            completed = True
        except JobTimeout:
            completed = True  # cancelled by the deadline
            error = state.timeout_error()
            state.metrics.error(error.type, error.code)
            yield _sse(error.body())
        except Exception as e:  # noqa: BLE001 - headers are sent: report in the stream
            completed = True
            job.cancel()
            rid = request.state.request_id
            logger.error("request %s failed while streaming: %s", rid, redacted_traceback(e))
            state.metrics.error("server_error", "internal_error")
            yield _sse(
                error_body(
                    f"internal server error (error id {rid})", "server_error", "internal_error"
                )
            )
        finally:
            if not completed:  # the client went away: free the worker for the next request
                job.cancel()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
