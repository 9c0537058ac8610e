"""A bounded FIFO queue in front of the LLM worker threads, bridged to asyncio.

The runtime decodes up to `slots` sequences together (cxrlite.runtime.batching), so as many worker
threads run generations, taking jobs in the order requests became ready; each worker drives one
generation (a report: its findings, then its impression) while the runtime's engine batches them
all. `set_workers(runtime.slots)` is called once the runtime is ready. A request is *admitted*
(`admit()`) before its image work starts, so the bound counts everything waiting for the LLM,
image work included; a full queue is refused at once (`QueueFull`: the app answers 503 +
Retry-After) instead of letting latency grow without limit. Image work runs in the image
threads, outside this queue, so the next request's image is decoded and encoded while others
decode tokens.

A `Job` carries the work (a function run in the worker thread) and an `asyncio.Queue` of what
it emits, filled from the worker with `loop.call_soon_threadsafe`: the event loop never waits
on the LLM. `Job.cancel()` (timeout, client gone) withdraws a queued job or cancels a running
generation before its next token.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """No room for another request."""


class SchedulerStopped(Exception):
    """The server is shutting down."""


class JobTimeout(Exception):
    """The request's deadline passed; its job, if it had one, was cancelled."""


DONE, ERROR, EVENT = "done", "error", "event"


class Job:
    """One unit of LLM work; `work(job)` runs in the worker thread and may `emit` events."""

    def __init__(
        self,
        work: Callable[[Job], Any],
        loop: asyncio.AbstractEventLoop,
        generation: Any = None,
    ) -> None:
        self.work, self.loop, self.generation = work, loop, generation
        self.outbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancel_requested = threading.Event()
        self.started = threading.Event()
        self.finished = threading.Event()
        self.submitted_at = self.started_at = self.first_token_at = 0.0
        self.result: Any = None
        self._scheduler: Scheduler | None = None

    @property
    def queue_s(self) -> float:
        return max(0.0, (self.started_at or time.perf_counter()) - self.submitted_at)

    def emit(self, item: Any) -> None:
        self._post((EVENT, item))

    def cancel(self) -> None:
        """Withdraw the job if it waits; otherwise stop its generation before the next token."""
        self.cancel_requested.set()
        if self._scheduler is not None and self._scheduler.withdraw(self):
            return
        if self.generation is not None:
            self.generation.cancel()

    def _post(self, item: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _finish(self, kind: str, value: Any) -> None:
        if kind == DONE:
            self.result = value
        self.finished.set()
        self._post((kind, value))

    async def events(self, deadline: float) -> AsyncIterator[Any]:
        """What the work emits, until it finishes. Raises the work's exception, or JobTimeout
        (after cancelling the job) when `deadline` (time.perf_counter()) passes."""
        while True:
            remaining = deadline - time.perf_counter()
            try:
                if remaining <= 0:
                    raise TimeoutError
                kind, value = await asyncio.wait_for(self.outbox.get(), remaining)
            except TimeoutError:
                self.cancel()
                raise JobTimeout from None
            if kind == EVENT:
                yield value
            elif kind == ERROR:
                raise value
            else:
                return


class Ticket:
    """A place in the queue, held from admission until the job is submitted or given up; as a
    context manager, given up on leaving unless a job took it."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler, self.open = scheduler, True

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self.open:
            self.open = False
            self._scheduler._release()


class Scheduler:
    def __init__(self, max_queue: int, on_start: Callable[[Job], None] | None = None) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue, self.on_start = max_queue, on_start
        self._cond = threading.Condition()
        self._ready: collections.deque[Job] = collections.deque()
        self._admitted = 0  # holding a ticket: image work, or queued for the worker
        self._stopping = False
        self._started = False
        self._threads: list[threading.Thread] = []
        self.running: list[Job] = []  # started, not finished, oldest first

    @property
    def depth(self) -> int:
        return self._admitted

    @property
    def current(self) -> Job | None:
        """The oldest running job."""
        running = list(self.running)
        return running[0] if running else None

    @property
    def workers(self) -> int:
        return len(self._threads)

    def start(self, workers: int = 1) -> None:
        self._started = True
        self.set_workers(workers)

    def set_workers(self, workers: int) -> None:
        """Run up to `workers` jobs at once (never fewer than already run: threads only grow)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        with self._cond:
            if not self._started or self._stopping:
                return
            while len(self._threads) < workers:
                thread = threading.Thread(
                    target=self._run, name=f"cxrlite-llm-worker-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()

    def admit(self) -> Ticket:
        with self._cond:
            if self._stopping:
                raise SchedulerStopped
            if self._admitted >= self.max_queue:
                raise QueueFull
            self._admitted += 1
            self._cond.notify_all()
        return Ticket(self)

    def _release(self) -> None:
        with self._cond:
            self._admitted -= 1
            self._cond.notify_all()

    def wait_for_depth(self, depth: int, timeout_s: float) -> bool:
        """Block until `depth` requests are admitted and not yet running (tests, shutdown)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._admitted == depth, timeout_s)

    def submit(self, ticket: Ticket, job: Job) -> Job:
        if not ticket.open:
            raise RuntimeError("this ticket was already used or released")
        ticket.open = False  # its place passes to the job, given back when the worker takes it
        job._scheduler, job.submitted_at = self, time.perf_counter()
        with self._cond:
            if self._stopping:
                self._admitted -= 1
                raise SchedulerStopped
            self._ready.append(job)
            self._cond.notify_all()
        return job

    def withdraw(self, job: Job) -> bool:
        """Take a job out of the queue if it has not started; True if it was."""
        with self._cond:
            if job not in self._ready:
                return False
            self._ready.remove(job)
            self._admitted -= 1
            self._cond.notify_all()
        job._finish(ERROR, JobTimeout())
        return True

    def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new work, fail queued jobs, cancel the running one and join the worker."""
        with self._cond:
            self._stopping = True
            queued, self._ready = list(self._ready), collections.deque()
            self._admitted -= len(queued)
            self._cond.notify_all()
        for job in queued:
            job._finish(ERROR, SchedulerStopped())
        for job in list(self.running):
            job.cancel()
        deadline = time.perf_counter() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.perf_counter()))
            if thread.is_alive():
                logger.warning("an LLM worker did not stop within %.0f s", timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if not self._ready:
                    return
                job = self._ready.popleft()
                self._admitted -= 1
                self.running.append(job)
                self._cond.notify_all()
            job.started_at = time.perf_counter()
            job.started.set()
            try:
                if self.on_start is not None:
                    self.on_start(job)
                job._finish(DONE, job.work(job))
            except BaseException as e:  # noqa: BLE001 - handed to the request, which answers
                job._finish(ERROR, e)
            finally:
                with self._cond:
                    self.running.remove(job)
