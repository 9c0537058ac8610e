"""One generation: prefill, then token by token, streamed as `TokenEvent`s, cancellable, timed.

A `Generation` is an iterator. Its LLM work starts at the first `next()` and holds the runtime's
LLM lock until the last token, so every Generation must be consumed to the end or closed
(`with runtime.generate(...) as gen:` does it); a server that loses its client calls `close()`
or `cancel()`. The final event has `token_id=None`, the `finish_reason`, and any text held
back for stop strings; `gen.result` (a `Completion`) is set before it is yielded.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from cxrlite.runtime.sampling import Sampler, SamplingParams, TextStream

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
        backend: Any,
        tokenizer: Any,
        segments: Sequence[Any],
        n_prompt: int,
        params: SamplingParams,
        stop_ids: set[int],
        session: Callable[[], contextlib.AbstractContextManager],
        started: float,
        timings: dict[str, float],
        cache_hit: bool | None,
        prefix_cache: bool = False,
        cancelled: threading.Event | None = None,
    ) -> None:
        self._backend, self._tokenizer, self._segments = backend, tokenizer, segments
        self._prefix_cache = prefix_cache
        self._params, self._stop_ids, self._session = params, stop_ids, session
        self._started, self._cache_hit, self.n_prompt = started, cache_hit, n_prompt
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
        """Stop now and release the LLM (idempotent)."""
        self._events.close()

    def collect(self) -> Completion:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def _finish(self, tokens: list[int], text: str, reason: str, first: float | None) -> None:
        end = time.perf_counter()
        n = len(tokens)
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

    def _prefill(self) -> Any:
        """The prompt's last logits; with the prefix cache on and a backend that can (llama.cpp),
        the KV cache of the prompt prefix it already holds is kept and only the rest decoded."""
        reuse = getattr(self._backend, "prefill_reusing", None)
        if self._prefix_cache and reuse is not None:
            logits, cached = reuse(self._segments)
        else:
            logits, cached = self._backend.prefill(self._segments), 0
        self.timings["prompt_cached_tokens"] = cached
        return logits

    def _run(self) -> Iterator[TokenEvent]:
        backend, params = self._backend, self._params
        stream = TextStream(self._tokenizer, params.stop)
        sampler = Sampler(params)
        tokens: list[int] = []
        reason: str | None = None  # None while running
        first: float | None = None
        on_stop_string = False
        waited = time.perf_counter()
        try:
            with self._session():
                begun = time.perf_counter()
                self.timings["queue_ms"] = ms(begun - waited)
                logits = None if self._cancelled.is_set() else self._prefill()
                while logits is not None:
                    token, logprob = sampler(logits)
                    if first is None:
                        first = time.perf_counter()
                        self.timings["prefill_ms"] = ms(first - begun)
                        self.timings["ttft_ms"] = ms(first - self._started)
                    if token in self._stop_ids:
                        reason = "stop"
                        break
                    tokens.append(token)
                    piece, on_stop_string = stream.push(token)
                    if on_stop_string:
                        reason = "stop"
                    elif len(tokens) >= params.max_tokens or backend.n_past >= backend.n_ctx:
                        reason = "length"
                    yield TokenEvent(len(tokens) - 1, token, piece, _finite(logprob))
                    if reason is not None or self._cancelled.is_set():
                        break
                    logits = backend.step(token)
        except GeneratorExit:  # closed by the consumer: no final event can be yielded
            self._finish(tokens, stream.released, "cancelled", first)
            raise
        reason = reason or "cancelled"
        rest = "" if on_stop_string else stream.flush()
        self._finish(tokens, stream.released, reason, first)
        yield TokenEvent(len(tokens), None, rest, None, reason)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
