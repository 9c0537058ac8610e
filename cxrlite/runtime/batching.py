"""Continuous batching: one thread decodes every running sequence together, a step at a time.

Decoding a memory-bound LLM reads every weight once per step whatever the batch, so N sequences
decoded in one step cost little more than one. The `DecodeEngine` owns the LLM backend (an
`LLMBackend`: the llama.cpp backend with `slots` sequences, or the PyTorch one with a single
slot) and runs a loop in its own thread:

1. new requests take free slots (the slot whose KV cache shares the longest prefix with the
   prompt, else the least recently used): the shared prefix is kept, the rest dropped, so a
   slot's cache never carries another request's positions past what both prompts share;
2. one step: a token for each generating sequence, then prefill rows of new sequences up to
   `n_batch` rows in all (a long prompt, an image's embeddings, is split over steps so that one
   new study does not stall everyone's tokens; an image that attends to itself both ways goes
   whole);
3. each sequence that got logits samples its next token (its own `Sampler`: greedy is the same
   as unbatched, a seed gives the same draws) or, for scoring, the log-probabilities of the
   answer tokens; a sequence that hits a stop id, `max_tokens`, its context or a cancel ends
   and frees its slot at once, and the next request joins at the next step.

Callers never touch the backend: `submit()` returns a `SequenceHandle` whose events (tokens, the
end, scores or an error) arrive on a queue; `cancel()` ends the sequence before its next step.
No library fits: llama-cpp-python's server batches nothing, and llama.cpp's own scheduler lives
in its C++ server, which takes neither our token ids nor our image embeddings.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cxrlite.runtime.llm import LLMBackend
from cxrlite.runtime.positions import DecodeItem, Piece, PositionKey, skip, token_piece
from cxrlite.runtime.sampling import Sampler, SamplingParams, greedy, log_softmax

logger = logging.getLogger(__name__)

TOKEN, END, SCORES, ERROR = "token", "end", "scores", "error"


@dataclass
class SequenceRequest:
    """A prompt to continue (`sampling`) or to score (`answer_ids`: the pieces end with all but
    the last answer token, and `n_prompt` positions come before the answer)."""

    pieces: list[Piece]
    total: int
    sampling: SamplingParams | None = None
    stop_ids: frozenset[int] = frozenset()
    prefix_cache: bool = True
    answer_ids: list[int] | None = None
    n_prompt: int = 0
    wanted: list[PositionKey] = field(init=False)

    def __post_init__(self) -> None:
        self.wanted = [key for piece in self.pieces for key in piece.keys]
        if self.answer_ids is None:
            self.n_prompt = self.total


class SequenceHandle:
    """The caller's side of a sequence: `events()` yields (kind, value) until the end."""

    def __init__(self, request: SequenceRequest, cancelled: threading.Event | None = None) -> None:
        self.request = request
        self._events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._external = cancelled  # the caller's: may stop a chain of sequences
        self.submitted = time.perf_counter()
        self.started: float | None = None  # when it took a slot
        self.first_token_at: float | None = None  # when its first token was sampled
        self.cached_tokens = 0  # prompt positions whose KV cache was kept

    def cancel(self) -> None:
        """End this sequence (not the caller's chain) before its next step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set() or (self._external is not None and self._external.is_set())

    def put(self, kind: str, value: Any = None) -> None:
        self._events.put((kind, value))

    def next_event(self) -> tuple[str, Any]:
        return self._events.get()

    def result(self) -> Any:
        """Wait for the end: the scores (scoring), the finish reason, or the error raised."""
        while True:
            kind, value = self.next_event()
            if kind == ERROR:
                raise value
            if kind in (END, SCORES):
                return value


@dataclass
class _Slot:
    index: int
    handle: SequenceHandle | None = None
    todo: list[Piece] = field(default_factory=list)  # prompt positions not yet decoded
    sampler: Sampler | None = None
    next_token: int | None = None  # sampled, to be decoded at the next step
    n_generated: int = 0
    scores: list[float] = field(default_factory=list)
    last_used: int = 0


class EngineClosed(RuntimeError):
    """The runtime was closed while the sequence waited or ran."""


class DecodeEngine:
    def __init__(self, decoder: LLMBackend, name: str = "cxrlite-decode") -> None:
        self.decoder = decoder
        self.slots = [_Slot(i) for i in range(decoder.slots)]
        self._pending: collections.deque[SequenceHandle] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._admissions = 0
        self.steps = 0  # decode steps run (stats)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- the callers' side -------------------------------------------------------------------

    def submit(
        self, request: SequenceRequest, cancelled: threading.Event | None = None
    ) -> SequenceHandle:
        """Queue a sequence; `cancelled` (the caller's event) ends it too when set."""
        handle = SequenceHandle(request, cancelled)
        with self._cond:
            if self._closed:
                raise EngineClosed("the runtime is closed")
            self._pending.append(handle)
            self._cond.notify_all()
        return handle

    def close(self, timeout_s: float = 60.0) -> bool:
        """Stop the loop (waiting and running sequences end with EngineClosed); whether its
        thread ended, so that the backend may be freed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def active(self) -> int:
        return sum(slot.handle is not None for slot in self.slots)

    @property
    def waiting(self) -> int:
        return len(self._pending)

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self.active:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self._iteration()
            except Exception as e:  # a bug here must not leave callers waiting forever
                logger.exception("the decode loop failed; ending every sequence")
                self._fail_all(e)
        self._fail_all(EngineClosed("the runtime was closed"))

    def _iteration(self) -> None:
        with self._cond:
            admitted = self._admit()
        for slot in admitted:
            self._start(slot)
        self._drop_cancelled()
        items = self._plan_step()
        if items:
            self._run_step(items)
        elif self.active:  # nothing to decode yet (cannot happen today): do not spin
            time.sleep(0.001)

    def _admit(self) -> list[_Slot]:
        """Waiting requests into free slots, first come first served (called under the lock)."""
        admitted = []
        while self._pending:
            free = [slot for slot in self.slots if slot.handle is None]
            if not free:
                break
            handle = self._pending.popleft()
            if handle.cancelled:
                handle.put(END, "cancelled")
                continue
            wanted = handle.request.wanted
            slot = max(
                free,
                key=lambda s: (self.decoder.shared_prefix(s.index, wanted), -s.last_used),
            )
            self._admissions += 1
            slot.handle, slot.last_used = handle, self._admissions
            admitted.append(slot)
        return admitted

    def _start(self, slot: _Slot) -> None:
        handle = slot.handle
        request = handle.request
        try:
            kept = self.decoder.prepare(
                slot.index, request.pieces, request.total, request.prefix_cache,
                limit=request.n_prompt - 1,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the request's error, handed to its caller
            self._end(slot, ERROR, e)
            return
        handle.cached_tokens, handle.started = kept, time.perf_counter()
        slot.todo = skip(request.pieces, kept)
        slot.sampler = Sampler(request.sampling) if request.sampling is not None else None
        slot.next_token, slot.n_generated, slot.scores = None, 0, []

    def _drop_cancelled(self) -> None:
        for slot in self.slots:
            if slot.handle is not None and slot.handle.cancelled:
                self._end(slot, END, "cancelled")
        with self._cond:
            for handle in [h for h in self._pending if h.cancelled]:
                self._pending.remove(handle)
                handle.put(END, "cancelled")

    def _plan_step(self) -> list[DecodeItem]:
        """A token of each generating sequence, then prefill rows, oldest request first."""
        items = [
            DecodeItem(slot.index, token_piece([slot.next_token]), 0, generated=True)
            for slot in self.slots
            if slot.handle is not None and slot.next_token is not None
        ]
        budget = self.decoder.n_batch - len(items)
        prefilling = [s for s in self.slots if s.handle is not None and s.todo]
        prefilling.sort(key=lambda s: s.last_used)
        first_prefill = True
        for slot in prefilling:
            if not self.decoder.chunked:  # the whole prompt at once (a single-slot backend)
                items += self._prefill_items(slot, len(slot.todo), None)
                continue
            piece = slot.todo[0]
            whole = piece.embeds is not None and self.decoder.bidirectional_image
            if whole and len(piece) > budget and not first_prefill:
                continue  # goes whole, at a later step with room for it
            if budget <= 0 and not whole:
                break
            size = len(piece) if whole else min(len(piece), budget)
            items += self._prefill_items(slot, 1, size)
            budget -= size
            first_prefill = False
        return items

    def _prefill_items(self, slot: _Slot, n_pieces: int, size: int | None) -> list[DecodeItem]:
        """The next prompt positions of a slot as items (taken off its todo list), logits
        wanted where a generation's last prompt row or a scored answer's rows fall."""
        pieces = slot.todo[:n_pieces]
        if size is not None and size < len(pieces[0]):
            slot.todo[0] = pieces[0].slice(size, len(pieces[0]))
            pieces = [pieces[0].slice(0, size)]
        else:
            del slot.todo[:n_pieces]
        items, start = [], self.decoder.seq_len(slot.index)
        want_from = slot.handle.request.n_prompt - 1  # first position whose logits are needed
        last = start + sum(len(p) for p in pieces) - 1 if not slot.todo else -1
        for piece in pieces:
            end = start + len(piece)
            if slot.sampler is not None:  # a generation needs the prompt's last row only
                logits_from = len(piece) - 1 if end - 1 == last else None
            else:
                logits_from = max(0, want_from - start) if end > want_from else None
            items.append(DecodeItem(slot.index, piece, logits_from))
            start = end
        return items

    def _run_step(self, items: list[DecodeItem]) -> None:
        self.steps += 1
        try:
            outputs = self.decoder.decode(items)
        except Exception as e:  # noqa: BLE001 - every sequence in the step fails with it
            for index in {item.seq for item in items}:
                self._end(self.slots[index], ERROR, e)
            return
        to_sample: list[tuple[_Slot, np.ndarray]] = []
        for item, logits in zip(items, outputs, strict=True):
            slot = self.slots[item.seq]
            if slot.handle is None or logits is None:
                continue
            if slot.sampler is None:
                self._scored(slot, logits)
            elif not slot.todo:
                if slot.next_token is None and slot.handle.request.prefix_cache:
                    self.decoder.save_state(slot.index)  # the prompt, before any answer
                to_sample.append((slot, logits[-1]))
        # Greedy sequences pick their tokens in one pass; the others each with its own sampler.
        plain = [(slot, row) for slot, row in to_sample if slot.sampler.params.temperature == 0]
        drawn = [(slot, row) for slot, row in to_sample if slot.sampler.params.temperature != 0]
        if plain:
            tokens, logprobs = greedy(np.stack([row for _, row in plain]))
            for (slot, _), token, logprob in zip(plain, tokens, logprobs, strict=True):
                self._sampled(slot, int(token), float(logprob))
        for slot, row in drawn:
            self._sampled(slot, *slot.sampler(row))

    def _sampled(self, slot: _Slot, token: int, logprob: float) -> None:
        handle = slot.handle
        request = handle.request
        if handle.first_token_at is None:
            handle.first_token_at = time.perf_counter()
        if token in request.stop_ids:
            self._end(slot, END, "stop")
            return
        slot.n_generated += 1
        handle.put(TOKEN, (token, logprob))
        full = self.decoder.seq_len(slot.index) >= self.decoder.n_ctx
        if slot.n_generated >= request.sampling.max_tokens or full:
            self._end(slot, END, "length")
        else:
            slot.next_token = token

    def _scored(self, slot: _Slot, logits: np.ndarray) -> None:
        answer = slot.handle.request.answer_ids
        logp = log_softmax(logits)
        for row in logp:
            slot.scores.append(float(row[answer[len(slot.scores)]]))
        if len(slot.scores) == len(answer):
            self._end(slot, SCORES, np.asarray(slot.scores))

    def _end(self, slot: _Slot, kind: str, value: Any) -> None:
        handle = slot.handle
        slot.handle, slot.todo, slot.sampler, slot.next_token = None, [], None, None
        if kind == ERROR:  # its cache may hold what no key list describes
            self.decoder.forget(slot.index)
        handle.put(kind, value)

    def _fail_all(self, error: Exception) -> None:
        for slot in self.slots:
            if slot.handle is not None:
                self._end(slot, ERROR, error)
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for handle in pending:
            handle.put(ERROR, error)
