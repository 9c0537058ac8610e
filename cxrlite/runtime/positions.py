"""What a KV cache holds, one key per position, and the saved prompt states that outlive it.

A prompt is a list of segments, each token ids or a float32 [n, n_embd] array of embeddings (an
image). Every decoded position gets a key: its token id, or (digest of the embedding array, row
index). Comparing a new prompt's keys with a sequence's keys gives the prefix whose KV cache can
be kept (llama.cpp server's `cache_prompt`), and `SequenceStates` keeps copies of recent prompts'
KV caches so that two studies asked about in turn both find theirs.
"""

from __future__ import annotations

import ctypes
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Segment = Sequence[int] | np.ndarray
# A decoded position's identity: its token id, or (digest of the embedding array, row index).
PositionKey = int | tuple[bytes, int]


@dataclass(frozen=True)
class Piece:
    """Consecutive positions of one kind: token ids, or embedding rows."""

    tokens: list[int] | None
    embeds: np.ndarray | None  # float32 [n, n_embd], C-contiguous
    keys: Sequence[PositionKey]

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, start: int, stop: int) -> Piece:
        return Piece(
            self.tokens[start:stop] if self.tokens is not None else None,
            self.embeds[start:stop] if self.embeds is not None else None,
            self.keys[start:stop],
        )


@dataclass(frozen=True)
class DecodeItem:
    """The next positions of one sequence in a batched decode: a piece (or a slice of one) and
    the row from which its logits are wanted (None: none)."""

    seq: int
    piece: Piece
    logits_from: int | None = None
    generated: bool = False  # a sampled token being appended (not the prompt)


def token_piece(tokens: Sequence[int]) -> Piece:
    ids = [int(t) for t in tokens]
    return Piece(ids, None, ids)


def pieces_of(segments: Sequence[Segment]) -> list[Piece]:
    """Segments as pieces with their keys, unvalidated (backends check what they can take)."""
    pieces = []
    for segment in segments:
        if isinstance(segment, np.ndarray) and segment.dtype.kind == "f":
            embeds = np.ascontiguousarray(segment, dtype=np.float32)
            pieces.append(Piece(None, embeds, embedding_keys(embeds)))
        elif len(segment):
            pieces.append(token_piece(segment))
    return pieces


def embedding_keys(embeds: np.ndarray) -> list[PositionKey]:
    """One key per row: a digest of the whole array (shape included) and the row's index. One
    digest per array is cheaper than one per row and errs on the safe side: a row only matches
    a row of an identical array."""
    array = np.ascontiguousarray(embeds, dtype=np.float32)
    digest = hashlib.blake2b(repr(array.shape).encode(), digest_size=16)
    digest.update(memoryview(array).cast("B"))
    value = digest.digest()
    return [(value, row) for row in range(array.shape[0])]


def common_prefix_length(a: Sequence[PositionKey], b: Sequence[PositionKey]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def skip(pieces: Sequence[Piece], n: int) -> list[Piece]:
    """The pieces without their first n positions."""
    out = []
    for piece in pieces:
        if n >= len(piece):
            n -= len(piece)
            continue
        out.append(piece.slice(n, len(piece)) if n else piece)
        n = 0
    return out


def image_boundary(pieces: Sequence[Piece], n: int) -> int:
    """n, or the start of the image it falls inside: an image whose tokens attend to each other
    both ways is decoded whole, never resumed part-way."""
    start = 0
    for piece in pieces:
        end = start + len(piece)
        if piece.embeds is not None and start < n < end:
            return start
        start = end
    return n


class SequenceStates:
    """A bounded LRU of saved sequence states (a sequence's KV cache as llama.cpp serialises it),
    each with the position keys it holds, so that two alternating prompts (two studies asked
    about in turn) both find their prefix although a slot holds one sequence at a time."""

    def __init__(self, max_bytes: int, max_entries: int = 8) -> None:
        if max_bytes < 0 or max_entries < 0:
            raise ValueError(f"state cache bounds must be >= 0, got {max_bytes}, {max_entries}")
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self._entries: OrderedDict[tuple[PositionKey, ...], ctypes.Array] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, keys: Sequence[PositionKey]) -> bool:
        return tuple(keys) in self._entries

    def best(self, wanted: Sequence[PositionKey]) -> tuple[tuple[PositionKey, ...], int]:
        """The saved keys sharing the longest prefix with `wanted`, and that length."""
        found: tuple[PositionKey, ...] = ()
        longest = 0
        for keys in self._entries:
            n = common_prefix_length(keys, wanted)
            if n > longest:
                found, longest = keys, n
        return found, longest

    def get(self, keys: tuple[PositionKey, ...]) -> ctypes.Array:
        self._entries.move_to_end(keys)
        return self._entries[keys]

    def put(self, keys: Sequence[PositionKey], data: ctypes.Array) -> bool:
        """Store (evicting the least recently used); False when one entry exceeds the bound."""
        size = ctypes.sizeof(data)
        if size > self.max_bytes or self.max_entries == 0:
            return False
        key = tuple(keys)
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= ctypes.sizeof(old)
        self._entries[key] = data
        self.nbytes += size
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= ctypes.sizeof(evicted)
        return True

    def discard(self, keys: Sequence[PositionKey]) -> None:
        data = self._entries.pop(tuple(keys), None)
        if data is not None:
            self.nbytes -= ctypes.sizeof(data)

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
