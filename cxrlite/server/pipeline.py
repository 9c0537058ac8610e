"""The steps every model request shares, whatever its route.

A request's life: the middleware gives it an id and a start time and checks the API key; the
route validates it, takes a place in the queue (`scheduler.admit()`, 503 when full), decodes
and encodes its image in the image threads (`in_image_pool`), then hands the generation to the
one LLM worker as a `Job` and waits for it (`run_job`) or relays its tokens. The deadline
(`request_timeout_s` after the request arrived) covers it all: past it the job is cancelled and
`JobTimeout` becomes a 504. A client that disconnects cancels its job.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request

from cxrlite.imaging.decode import load_image
from cxrlite.server.scheduler import Job, JobTimeout
from cxrlite.server.security import decode_data_url, image_bytes
from cxrlite.server.settings import ServerSettings


def deadline_of(request: Request) -> float:
    """When the request must be answered, on the time.perf_counter() clock."""
    return request.state.started + request.app.state.settings.request_timeout_s


def remaining(deadline: float) -> float:
    return max(0.0, deadline - time.perf_counter())


async def in_image_pool(
    request: Request, fn: Callable[..., Any], *args: Any, deadline: float
) -> Any:
    """`fn(*args)` in the image threads, off the event loop; JobTimeout past the deadline."""
    pool = request.app.state.image_pool
    future = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    try:
        return await asyncio.wait_for(future, remaining(deadline))
    except TimeoutError:
        raise JobTimeout from None


async def image_source(
    url: str | None, settings: ServerSettings, deadline: float
) -> str | bytes | None:
    """A data URL as is (decoded later, off the event loop), a remote image's bytes."""
    if url is None or url[:5].lower() == "data:":
        return url
    timeout = min(settings.image_fetch_timeout_s, remaining(deadline))
    return await image_bytes(url, settings.allow_image_hosts, timeout, settings.max_body_bytes)


def encode_image(runtime: Any, source: str | bytes, max_pixels: int) -> Any:
    """A data URL's or an upload's embeddings: a file sent before skips decoding (the runtime's
    cache knows its bytes); a new one is decoded under the pixel cap first. Image thread."""
    raw = decode_data_url(source) if isinstance(source, str) else source
    file_key = runtime.file_key(raw)
    found = runtime.lookup_file(file_key)
    if found is not None:
        return found
    # "upload", never a file name or URL: those can carry patient names.
    image = load_image(raw, name="upload", max_pixels=max_pixels)
    return runtime.image_embeddings(image, file_key=file_key)


async def run_job(request: Request, job: Job, deadline: float) -> Any:
    """Wait for a job that emits nothing worth relaying; cancel it if the client leaves."""
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        async for _ in job.events(deadline):
            pass
    finally:
        watcher.cancel()
    return job.result


async def cancel_on_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return
