"""A bounded, thread-safe LRU cache of image embeddings keyed by the preprocessed pixels' content.

A study sent twice (a second question about the same radiograph, the impression after the
findings, a client retry) then skips the vision tower. The key is the sha256 of the preprocessed
pixels (shape and dtype included) and the vision variant, so two files holding the same image hit
the same entry, and a change of variant or preprocessing never returns stale embeddings.

A second, cheaper key maps the bytes of an uploaded file (sha256 of the file as received) to its
pixel key: a client that sends the same file again then skips decoding too, which on a real
2,500 px DICOM costs far more than the vision tower. Aliases only point at entries; an evicted
entry makes its aliases miss.

Bounded by entries and by bytes: a 7B LLaVA-size model keeps 576 x 4096 float32 per image
(9 MiB), so the entry count alone could let the cache grow to gigabytes.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

DEFAULT_MAX_ENTRIES = 256
DEFAULT_MAX_BYTES = 1 << 30


def bytes_key(raw: bytes | bytearray | memoryview, namespace: str = "") -> str:
    """sha256 of a file's bytes as received (and a namespace such as the variant)."""
    digest = hashlib.sha256(f"{namespace}|file|".encode())
    digest.update(raw)
    return digest.hexdigest()


def pixels_key(pixels: np.ndarray, namespace: str = "") -> str:
    """sha256 of the pixel content, shape and dtype (and a namespace such as the variant)."""
    array = np.ascontiguousarray(pixels)
    digest = hashlib.sha256()
    digest.update(f"{namespace}|{array.dtype.str}|{array.shape}|".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


class EmbeddingCache:
    """LRU of read-only float32 arrays. `max_entries=0` disables it (every get misses)."""

    def __init__(
        self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"cache bounds must be >= 0, got {max_entries}, {max_bytes}")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._aliases: OrderedDict[str, str] = OrderedDict()  # bytes key -> pixel key
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return value

    def get_alias(self, alias: str) -> tuple[str, np.ndarray] | None:
        """(pixel key, entry) of a file seen before, counted as a hit; None (not counted as a
        miss: the pixel lookup that follows counts it) when unknown or evicted."""
        with self._lock:
            key = self._aliases.get(alias)
            value = self._entries.get(key) if key is not None else None
            if value is None:
                return None
            self._aliases.move_to_end(alias)
            self._entries.move_to_end(key)
            self.hits += 1
            return key, value

    def add_alias(self, alias: str, key: str) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            self._aliases[alias] = key
            self._aliases.move_to_end(alias)
            # several files (DICOM headers differ) may hold one image: allow a few per entry
            while len(self._aliases) > 4 * self.max_entries:
                self._aliases.popitem(last=False)

    def peek(self, key: str) -> np.ndarray | None:
        """The entry without counting a hit or miss or refreshing its age."""
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, value: np.ndarray) -> np.ndarray:
        """Store a read-only copy (callers cannot change a cached entry in place); returns it."""
        stored = np.array(value, dtype=np.float32, copy=True)
        stored.setflags(write=False)
        if self.max_entries == 0 or stored.nbytes > self.max_bytes:
            return stored
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = stored
            self._bytes += stored.nbytes
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
        return stored

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._aliases.clear()
            self._bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "aliases": len(self._aliases),
                "bytes": self._bytes,
                "hits": self.hits,
                "misses": self.misses,
                "max_entries": self.max_entries,
                "max_bytes": self.max_bytes,
            }
