"""The DICOM service inside `cxrlite serve`: one process, one runtime, one LLM queue, one
/metrics. `create_app` calls `attach_dicom(app)` when `ServerSettings.dicom` is set; the app's
lifespan starts the service after the scheduler and stops it before.

A DICOM report is a job on the server's one LLM worker, like an HTTP request: it waits its
turn behind them (never beside them: the runtime decodes one sequence at a time), waits for a
place while the queue is full instead of failing, and is cancelled at shutdown (its study then
stays in the spool and is reported at the next start).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from cxrlite.pacs.metrics import DicomMetrics
from cxrlite.pacs.service import DicomService
from cxrlite.server.scheduler import Job, QueueFull, Scheduler, SchedulerStopped

_NO_LOOP = asyncio.new_event_loop()
_NO_LOOP.close()  # a job's events go nowhere (Job._post ignores a closed loop): we wait on it


class SchedulerExecutor:
    """Run `work(cancelled)` as a job on the scheduler's worker and wait for its result."""

    def __init__(self, scheduler: Scheduler, stopping: threading.Event) -> None:
        self.scheduler, self.stopping = scheduler, stopping

    def __call__(self, work: Callable[[threading.Event], Any]) -> Any:
        box: dict[str, Any] = {}

        def run(job: Job) -> None:
            try:
                box["result"] = work(job.cancel_requested)
            except BaseException as e:  # noqa: BLE001 - re-raised in the reporter thread
                box["error"] = e

        job = Job(run, _NO_LOOP)
        while True:
            if self.stopping.is_set():
                raise SchedulerStopped
            try:
                ticket = self.scheduler.admit()
                break
            except QueueFull:
                time.sleep(0.2)  # HTTP requests first; a study can wait
        self.scheduler.submit(ticket, job)
        while not job.finished.wait(0.2):
            if self.stopping.is_set():
                job.cancel()
        if "error" in box:
            raise box["error"]
        if "result" not in box:
            raise SchedulerStopped  # withdrawn or failed by the scheduler's shutdown
        return box["result"]


def attach_dicom(app: Any) -> DicomService:
    """A DicomService on `app.state.dicom`, sharing the app's runtime, queue and metrics."""
    state = app.state
    settings = state.settings
    settings.dicom.max_tokens = min(settings.report_max_tokens, settings.max_tokens_cap)
    settings.dicom.max_pixels = settings.max_pixels
    service = DicomService(
        settings.dicom,
        lambda: state.loader.runtime,
        metrics=DicomMetrics(state.metrics.registry),
    )
    service.execute = SchedulerExecutor(state.scheduler, service.stopping)
    state.dicom = service
    return service
