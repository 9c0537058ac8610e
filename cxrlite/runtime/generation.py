"""One generation: prefill, then token by token, streamed as `TokenEvent`s, cancellable, timed.

A `Generation` is an iterator. Its sequence is submitted to the runtime's decode engine
(cxrlite.runtime.batching) at the first `next()` and holds a slot there until the last token, so
every Generation must be consumed to the end or closed (`with runtime.generate(...) as gen:`
does it); a server that loses its client calls `close()` or `cancel()`. Detokenizing and stop
strings happen here, in the consumer's thread; sampling, stop ids and `max_tokens` in the engine.
The final event has `token_id=None`, the `finish_reason`, and any text held
back for stop strings; `gen.result` (a `Completion`) is set before it is yielded.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cxrlite.runtime.batching import END, ERROR, DecodeEngine, SequenceRequest
from cxrlite.runtime.sampling import TextStream

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class TokenEvent:
    index: int  # position in the completion; the final event carries the token count
    token_id: int | None  # None on the final event
    text: str  # text made final by this token (may be "": held back for a stop string)
    logprob: float | None = None  # the token's log-probability under the model
    finish_reason: str | None = None  # set on the final event only


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS, stop id or stop string), "length", "cancelled"
    timings: dict[str, float]
    cache_hit: bool | None  # None: no image
    usage: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "tokens": list(self.tokens),
            "finish_reason": self.finish_reason,
            "timings": dict(self.timings),
            "cache_hit": self.cache_hit,
            "usage": dict(self.usage),
        }


def ms(seconds: float) -> float:
    """Seconds as milliseconds, rounded to the microsecond (every timing cxrlite reports)."""
    return round(seconds * 1000.0, 3)


class Generation:
    """Iterate for `TokenEvent`s; `cancel()` (any thread) stops before the next token."""

    def __init__(
        self,
        *,
        engine: DecodeEngine,
        request: SequenceRequest,
        tokenizer: Any,
        session: Callable[[], contextlib.AbstractContextManager],
        started: float,
        timings: dict[str, float],
        cache_hit: bool | None,
        cancelled: threading.Event | None = None,
    ) -> None:
        self._engine, self._request, self._tokenizer = engine, request, tokenizer
        self._session, self._started, self._cache_hit = session, started, cache_hit
        self.n_prompt = request.total
        self.timings = dict(timings)
        # shared with the caller when given, so one event can stop a chain of generations
        self._cancelled = cancelled if cancelled is not None else threading.Event()
        self.result: Completion | None = None
        self._events = self._run()

    def __iter__(self) -> Iterator[TokenEvent]:
        return self

    def __next__(self) -> TokenEvent:
        return next(self._events)

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cancel(self) -> None:
        self._cancelled.set()

    def close(self) -> None:
        """Stop now and free the sequence's slot (idempotent)."""
        self._events.close()

    def collect(self) -> Completion:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def _finish(self, tokens: list[int], text: str, reason: str, handle: Any) -> None:
        end = time.perf_counter()
        n = len(tokens)
        first = handle.first_token_at if handle is not None else None
        started = handle.started if handle is not None and handle.started else end
        self.timings.update(
            queue_ms=ms(started - handle.submitted) if handle is not None else 0.0,
            prompt_cached_tokens=handle.cached_tokens if handle is not None else 0,
        )
        if first is not None:
            self.timings.update(prefill_ms=ms(first - started), ttft_ms=ms(first - self._started))
        decode_s = end - first if first is not None else 0.0
        self.timings.update(
            decode_ms=ms(decode_s),
            tokens_per_s=round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else 0.0,
            total_ms=ms(end - self._started),
        )
        self.result = Completion(
            text=text,
            tokens=tokens,
            finish_reason=reason,
            timings=self.timings,
            cache_hit=self._cache_hit,
            usage={
                "prompt_tokens": self.n_prompt,
                "completion_tokens": n,
                "total_tokens": self.n_prompt + n,
            },
        )

    def _run(self) -> Iterator[TokenEvent]:
        params = self._request.sampling
        stream = TextStream(self._tokenizer, params.stop)
        tokens: list[int] = []
        reason: str | None = None  # None while running
        on_stop_string = False
        handle = None
        try:
            with self._session():
                handle = self._engine.submit(self._request, self._cancelled)
                while reason is None:
                    kind, value = handle.next_event()
                    if kind == ERROR:
                        raise value
                    if kind == END:
                        reason = value
                        break
                    token, logprob = value
                    tokens.append(token)
                    piece, on_stop_string = stream.push(token)
                    if on_stop_string:
                        reason = "stop"
                        handle.cancel()  # the engine may be a token ahead: ends it there
                    yield TokenEvent(len(tokens) - 1, token, piece, _finite(logprob))
                    if reason is None and self._cancelled.is_set():
                        reason = "cancelled"
                        handle.cancel()
        except GeneratorExit:  # closed by the consumer: no final event can be yielded
            if handle is not None:
                handle.cancel()
            self._finish(tokens, stream.released, "cancelled", handle)
            raise
        except BaseException:
            if handle is not None:
                handle.cancel()
            raise
        rest = "" if on_stop_string else stream.flush()
        self._finish(tokens, stream.released, reason, handle)
        yield TokenEvent(len(tokens), None, rest, None, reason)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
