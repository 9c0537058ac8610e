"""The radiology route: `POST /v1/reports` takes one radiograph (multipart `file`: DICOM, PNG or
JPEG) and answers its draft report (findings, impression, CheXpert labels) with usage and
timings. The report runs as one job on the LLM worker, cancelled between any two tokens. A DICOM
that is not a chest radiograph (cxrlite.pacs.chest) is refused with 422 not_chest_radiograph,
its reason in the message, unless the form field allow_non_chest is true."""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse

from cxrlite.pacs.chest import check_chest_radiograph
from cxrlite.runtime.generation import ms
from cxrlite.server.errors import ERROR_RESPONSES, APIError
from cxrlite.server.pipeline import deadline_of, encode_image, in_image_pool, run_job
from cxrlite.server.scheduler import Job

router = APIRouter()
HTTP_OVERRIDE = "send the form field allow_non_chest=true to report anyway"


def report_job(runtime: Any, embedded: Any, max_tokens: int) -> Job:
    """The report of an encoded image as a job; its cancel event stops it between tokens."""

    def work(job: Job) -> dict[str, Any]:
        return runtime.report(embedded, max_tokens=max_tokens, cancelled=job.cancel_requested)

    return Job(work, asyncio.get_running_loop())


def record(request: Request, embedded: Any, result: dict[str, Any]) -> None:
    """The report's image lookup and token counts, in the metrics and the access line."""
    metrics = request.app.state.metrics
    metrics.image_lookup(embedded.cache_hit, (embedded.preprocess_ms + embedded.vision_ms) / 1000)
    metrics.prompt_tokens.inc(result["usage"]["prompt_tokens"])
    metrics.generated_tokens.inc(result["usage"]["completion_tokens"])
    request.state.usage = result["usage"]


@router.post("/v1/reports", responses=ERROR_RESPONSES)
async def reports(
    request: Request,
    file: Annotated[UploadFile, File(description="A DICOM, PNG or JPEG radiograph.")],
    max_tokens: Annotated[int | None, Form(gt=0)] = None,
    allow_non_chest: Annotated[
        bool, Form(description="Report a DICOM that the chest-radiograph check refuses.")
    ] = False,
) -> JSONResponse:
    state = request.app.state
    runtime = state.loader.ready()
    settings = state.settings
    max_tokens = min(max_tokens or settings.report_max_tokens, settings.max_tokens_cap)
    deadline = deadline_of(request)
    with state.scheduler.admit() as ticket:
        raw = await file.read()
        if not raw:
            raise APIError(400, "the uploaded file is empty", code="empty_file", param="file")
        if not allow_non_chest:  # a refused DICOM: 422 not_chest_radiograph, with its reason
            check = partial(check_chest_radiograph, label="upload", override=HTTP_OVERRIDE)
            await in_image_pool(request, check, raw, deadline=deadline)
        embedded = await in_image_pool(
            request, encode_image, runtime, raw, settings.max_pixels, deadline=deadline
        )
        job = state.scheduler.submit(ticket, report_job(runtime, embedded, max_tokens))
    result = await run_job(request, job, deadline)
    result["timings"].update(
        queue_ms=ms(job.queue_s),
        request_ms=ms(time.perf_counter() - request.state.started),
    )
    record(request, embedded, result)
    body = {"id": f"report-{request.state.request_id}", "object": "report"}
    return JSONResponse({**body, "model": runtime.model_id, **result})
