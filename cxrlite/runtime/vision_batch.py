"""The vision tower runs once for every image waiting for it: micro-batching without a thread.

Several requests arrive together (radiologists, a PACS pushing a morning's studies), each in its
own image thread. The first thread to find the tower free becomes the leader: it takes every
image waiting (up to `max_batch`), encodes them as one batch (the ONNX graph and TensorRT
profiles have a dynamic batch dimension), and hands each waiting thread its rows; the others
wait for the tower, and find their result ready or lead the next batch. The same pixels asked for
twice (the same study sent by two clients) are encoded once. A library batcher would need its
own thread and event loop; this one adds neither.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_MAX_BATCH = 8


@dataclass
class _Wanted:
    pixels: np.ndarray
    done: threading.Event = field(default_factory=threading.Event)
    result: np.ndarray | None = None
    error: BaseException | None = None


class VisionBatcher:
    def __init__(
        self, encode_batch: Callable[[np.ndarray], np.ndarray], max_batch: int = DEFAULT_MAX_BATCH
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._encode_batch, self.max_batch = encode_batch, max_batch
        self._tower = threading.Lock()  # one batch at a time
        self._lock = threading.Lock()  # guards _waiting and _running
        self._waiting: dict[str, _Wanted] = {}  # insertion order: first come, first encoded
        self._running: dict[str, _Wanted] = {}
        self.batches = self.images = 0  # counters (stats, tests)

    def encode(self, pixels: np.ndarray, key: str) -> np.ndarray:
        """[C, S, S] pixels -> their embeddings [n, n_embd]; `key` names the pixels' content."""
        with self._lock:
            wanted = self._waiting.get(key) or self._running.get(key)
            if wanted is None:
                wanted = self._waiting[key] = _Wanted(pixels)
        while not wanted.done.is_set():
            with self._tower:
                if not wanted.done.is_set():
                    self._run_batch()
        if wanted.error is not None:
            raise wanted.error
        return wanted.result

    def _run_batch(self) -> None:
        with self._lock:
            keys = list(self._waiting)[: self.max_batch]
            batch = {key: self._waiting.pop(key) for key in keys}
            self._running.update(batch)
        try:
            out = self._encode_batch(np.stack([w.pixels for w in batch.values()]))
            for i, wanted in enumerate(batch.values()):
                wanted.result = out[i]
        except Exception as e:  # every image of the batch fails with it
            for wanted in batch.values():
                wanted.error = e
        finally:
            with self._lock:
                for key in keys:
                    self._running.pop(key, None)
            for wanted in batch.values():
                wanted.done.set()
            self.batches, self.images = self.batches + 1, self.images + len(batch)

    def stats(self) -> dict[str, Any]:
        return {"batches": self.batches, "images": self.images, "max_batch": self.max_batch}
