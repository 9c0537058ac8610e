"""Run a llama GGUF through llama-cpp-python's low-level API, with token ids and embeddings.

The high-level `llama_cpp.Llama` class takes text or token ids only. Image embeddings have to enter
as rows of `llama_batch.embd` (a batch made by `llama_batch_init(n, n_embd, 1)`), so this wraps
the C API directly: one model, one context, one sequence, and a position counter. A prompt is a
list of segments, each either token ids or a float32 [n, n_embd] array; segments are decoded in
order into the same KV cache, which is how "<s>USER: <image x N>\\n question ASSISTANT:" is fed.
Runtimes feed our own token ids: llama.cpp's tokenizer may split text around special tokens
differently from ours.

Prompt-prefix reuse (`eval_reusing`, what llama.cpp's server calls `cache_prompt`): the object
remembers one key per decoded position (the token id, or the embedding array's digest and row),
so a new prompt that starts like the current sequence (the same image and chat text, a follow-up
turn) drops only the KV cache past the shared prefix and decodes the rest. Prefill dominates time
to first token on a CPU, so a repeated image then costs a single position instead of ~90. With
`state_cache_bytes`, copies of recent prompts' KV cache (`SequenceStates`, a bounded LRU) let
two studies asked about in turn both reuse theirs, though the context holds one sequence.

Gemma 3 lets an image's tokens attend to each other both ways: for a GGUF of such a family
(`LLM_FAMILIES`) an embedding segment is decoded with causal attention off and in one batch, as
llama.cpp's own multimodal library (mtmd) decodes image embeddings.

llama.cpp's log lines go to the `cxrlite.llama_cpp` logger (DEBUG, warnings and errors at their
level) instead of stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.errors import CxrliteError
from cxrlite.model.config import LLM_FAMILIES

logger = logging.getLogger(__name__)
native_logger = logging.getLogger("cxrlite.llama_cpp")

Segment = Sequence[int] | np.ndarray
# A decoded position's identity: its token id, or (digest of the embedding array, row index).
PositionKey = int | tuple[bytes, int]

_init_lock = threading.Lock()
_initialised = False
_log_callback: Any = None  # kept alive: llama.cpp holds a raw pointer to it


# KV cache element types (ggml_type); "f32" (with flash_attn=False) is for parity checks.
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}
# Saved prompt states of a runtime's llama.cpp backend (see SequenceStates). A state grows with
# the model's KV size: small models keep hundreds, the largest shapes' states do not fit at all.
DEFAULT_STATE_CACHE_BYTES = 256 << 20
# general.architecture values whose image embeddings are decoded non-causally
_BIDIRECTIONAL_IMAGE_ARCHS = {
    family.gguf_arch.lower() for family in LLM_FAMILIES.values() if family.bidirectional_image
}


class LlamaCppError(CxrliteError, RuntimeError):
    """llama.cpp could not load the model or decode a batch; the message says which and why."""


@dataclass(frozen=True)
class _Piece:
    tokens: list[int] | None
    embeds: np.ndarray | None  # float32 [n, n_embd], C-contiguous
    keys: Sequence[PositionKey]


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


def _skip(pieces: list[_Piece], n: int) -> list[_Piece]:
    """The pieces without their first n positions."""
    out = []
    for piece in pieces:
        size = len(piece.keys)
        if n >= size:
            n -= size
            continue
        out.append(
            _Piece(
                piece.tokens[n:] if piece.tokens is not None else None,
                piece.embeds[n:] if piece.embeds is not None else None,
                piece.keys[n:],
            )
        )
        n = 0
    return out


def _image_boundary(pieces: list[_Piece], n: int) -> int:
    """n, or the start of the image it falls inside: an image whose tokens attend to each other
    both ways is decoded whole, never resumed part-way."""
    start = 0
    for piece in pieces:
        end = start + len(piece.keys)
        if piece.embeds is not None and start < n < end:
            return start
        start = end
    return n


class SequenceStates:
    """A bounded LRU of saved sequence states (seq 0's KV cache as llama.cpp serialises it),
    each with the position keys it holds, so that two alternating prompts (two studies asked
    about in turn) both find their prefix although the context holds only one sequence."""

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


def _route_native_logs(llama_cpp: Any) -> None:
    global _log_callback
    # ggml_log_level: 1 debug, 2 info (load chatter: DEBUG here), 3 warn, 4 error, 5 continuation.
    # llama.cpp warns per tensor about expected things (k-quant fallbacks on narrow rows, which
    # quantize_gguf summarises itself): INFO here, so a quiet CLI stays quiet; errors stay errors.
    levels = {3: logging.INFO, 4: logging.ERROR}
    previous = [logging.DEBUG]

    @llama_cpp.llama_log_callback
    def forward(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        py_level = previous[0] if level == 5 else levels.get(level, logging.DEBUG)
        previous[0] = py_level
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            native_logger.log(py_level, "%s", message)

    _log_callback = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


def import_llama_cpp() -> Any:
    """llama_cpp, with the backend initialised once and its logs routed to Python logging."""
    global _initialised
    try:
        import llama_cpp
    except ImportError as e:
        raise LlamaCppError(
            "llama-cpp-python is not installed (pip install llama-cpp-python); it is needed to "
            f"run or quantize GGUF files ({e})"
        ) from None
    with _init_lock:
        if not _initialised:
            _route_native_logs(llama_cpp)
            llama_cpp.llama_backend_init()
            _initialised = True
    return llama_cpp


class LlamaCppLLM:
    """One GGUF model with one context and one sequence (seq_id 0).

    >>> with LlamaCppLLM("llm-q8_0.gguf", n_ctx=1024) as llm:
    ...     logits = llm.eval([prompt_ids[:5], image_embeds, prompt_ids[6:]])
    """

    def __init__(
        self,
        gguf_path: str | os.PathLike,
        n_ctx: int = 2048,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        state_cache_bytes: int = 0,
    ) -> None:
        self._llama_cpp = lib = import_llama_cpp()
        self.path = Path(gguf_path)
        self._model = self._ctx = None
        self._token_batch = self._embd_batch = None
        if not self.path.is_file():
            raise LlamaCppError(f"{self.path}: GGUF file not found")
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise LlamaCppError(f"{self.path}: llama.cpp could not load this GGUF (see DEBUG log)")
        vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        threads = n_threads or os.cpu_count() or 1
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = ctx_params.n_ubatch = n_batch
        ctx_params.n_seq_max = 1
        ctx_params.n_threads = ctx_params.n_threads_batch = threads
        if kv_type not in KV_TYPES:
            raise LlamaCppError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        ctx_params.type_k = ctx_params.type_v = KV_TYPES[kv_type]
        # llama_flash_attn_type: -1 auto (on for CPU), 0 off, 1 on. Its CPU kernel rounds through
        # f16 (~1e-3 on the logits); off gives the exact f32 path for parity checks.
        ctx_params.flash_attn_type = -1 if flash_attn is None else int(flash_attn)
        self._ctx = lib.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            self.close()
            raise LlamaCppError(
                f"{self.path}: could not create a llama.cpp context (n_ctx={n_ctx})"
            )
        # llama.cpp rounds n_ctx up (to 256) and caps n_batch at it; use what it really made,
        # since a batch larger than its n_batch aborts the process instead of returning an error.
        self.n_ctx = int(lib.llama_n_ctx(self._ctx))
        self.n_batch = min(n_batch, int(lib.llama_n_batch(self._ctx)))
        self.arch = self.metadata("general.architecture") or ""
        self.bidirectional_image = self.arch in _BIDIRECTIONAL_IMAGE_ARCHS
        self._token_batch = lib.llama_batch_init(n_batch, 0, 1)
        self._embd_batch = lib.llama_batch_init(n_batch, self.n_embd, 1)
        self.n_past = 0
        # What the KV cache holds, one key per position (`position_keys`): eval_reusing
        # compares a new prompt with it. len(self._keys) == self.n_past at all times.
        self._keys: list[PositionKey] = []
        # Saved prompt states for eval_reusing (0 bytes: none kept).
        self.states = SequenceStates(state_cache_bytes) if state_cache_bytes else None

    # --- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        lib = self._llama_cpp
        for name in ("_token_batch", "_embd_batch"):
            batch = getattr(self, name, None)
            if batch is not None:
                lib.llama_batch_free(batch)
                setattr(self, name, None)
        if getattr(self, "_ctx", None):
            lib.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # At interpreter exit the ctypes functions may already be torn down; nothing to free then.
        with contextlib.suppress(Exception):
            self.close()

    def reset(self) -> None:
        """Forget the sequence: clear the KV cache and start again at position 0."""
        lib = self._llama_cpp
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        self.n_past = 0
        self._keys.clear()

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text (e.g. "tokenizer.chat_template"), or None."""
        size = 1 << 16
        buf = ctypes.create_string_buffer(size)
        n = self._llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, size)
        if n < 0:
            return None
        if n >= size:  # truncated; ask again with room for it
            buf = ctypes.create_string_buffer(n + 1)
            self._llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    # --- decoding ----------------------------------------------------------------------------

    def _parse(self, segments: Sequence[Segment]) -> tuple[list[_Piece], int]:
        """Segments as pieces with their position keys, validated before any decode so that bad
        input never leaves a half-appended sequence behind."""
        pieces: list[_Piece] = []
        for segment in segments:
            if isinstance(segment, np.ndarray) and segment.dtype.kind == "f":
                embeds = np.ascontiguousarray(segment, dtype=np.float32)
                if embeds.ndim != 2 or embeds.shape[1] != self.n_embd:
                    raise LlamaCppError(
                        f"embeddings must be [n, {self.n_embd}] float32, got {tuple(segment.shape)}"
                    )
                if self.bidirectional_image and embeds.shape[0] > self.n_batch:
                    raise LlamaCppError(
                        f"an image of {embeds.shape[0]} embeddings must be decoded in one batch "
                        f"({self.arch}: its tokens attend to each other); raise n_batch above "
                        f"{self.n_batch}"
                    )
                pieces.append(_Piece(None, embeds, embedding_keys(embeds)))
            else:
                tokens = [int(t) for t in segment]
                for token in tokens:
                    if not 0 <= token < self.n_vocab:
                        raise LlamaCppError(
                            f"token id {token} is outside the vocabulary ({self.n_vocab})"
                        )
                pieces.append(_Piece(tokens, None, tokens))
        total = sum(len(piece.keys) for piece in pieces)
        if total == 0:
            raise LlamaCppError("nothing to decode: all segments are empty")
        return pieces, total

    def _decode_chunk(self, tokens: list[int] | None, embeds: np.ndarray | None, want: bool):
        lib = self._llama_cpp
        n = len(tokens) if tokens is not None else embeds.shape[0]
        batch = self._token_batch if tokens is not None else self._embd_batch
        if tokens is not None:
            for i, token in enumerate(tokens):
                batch.token[i] = token
        else:
            ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
        for i in range(n):
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if want else 0
        batch.n_tokens = n
        non_causal = embeds is not None and self.bidirectional_image
        if non_causal:
            lib.llama_set_causal_attn(self._ctx, False)
        try:
            status = lib.llama_decode(self._ctx, batch)
        finally:
            if non_causal:
                lib.llama_set_causal_attn(self._ctx, True)
        if status != 0:
            raise LlamaCppError(
                f"llama_decode failed with status {status} at position {self.n_past}"
            )
        self.n_past += n

    def _logits(self, index: int) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def _decode(self, pieces: list[_Piece], total: int, all_logits: bool) -> np.ndarray:
        if self.n_past + total > self.n_ctx:
            raise LlamaCppError(
                f"{self.n_past} + {total} positions exceed the context of {self.n_ctx}; "
                "raise n_ctx or shorten the prompt"
            )
        outputs: list[np.ndarray] = []
        done = 0
        try:
            for piece in pieces:
                n = len(piece.keys)
                for start in range(0, n, self.n_batch):
                    stop = min(start + self.n_batch, n)
                    last = done + stop == total
                    want = all_logits or last
                    tokens = piece.tokens[start:stop] if piece.tokens is not None else None
                    embeds = piece.embeds[start:stop] if piece.embeds is not None else None
                    self._decode_chunk(tokens, embeds, want)
                    self._keys.extend(piece.keys[start:stop])
                    if all_logits:
                        outputs.extend(self._logits(i) for i in range(stop - start))
                    elif last:
                        outputs.append(self._logits(stop - start - 1))
                done += n
        except BaseException:
            # A decode that failed part-way (or was interrupted) leaves the KV cache in a state
            # no key list describes: start again from nothing rather than reuse it.
            self.reset()
            raise
        return np.stack(outputs) if all_logits else outputs[-1]

    def eval(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        """Append the segments to the sequence; return the last position's logits [n_vocab], or
        with `all_logits` those of every appended position [n, n_vocab]. Bad input raises before
        anything is decoded; a failed decode resets the sequence."""
        pieces, total = self._parse(segments)
        return self._decode(pieces, total, all_logits)

    def eval_reusing(self, segments: Sequence[Segment]) -> tuple[np.ndarray, int]:
        """Make the sequence exactly `segments`, keeping the KV cache of the longest prefix it
        shares with what is already decoded (llama.cpp server's `cache_prompt`): returns the last
        position's logits and how many positions were reused. The last position is always
        decoded again, since its logits are needed."""
        pieces, total = self._parse(segments)
        if total > self.n_ctx:
            raise LlamaCppError(
                f"{total} positions exceed the context of {self.n_ctx}; "
                "raise n_ctx or shorten the prompt"
            )
        wanted = [key for piece in pieces for key in piece.keys]
        try:
            reused = min(common_prefix_length(self._keys, wanted), total - 1)
            if self.states is not None:
                saved, shared = self.states.best(wanted)
                if min(shared, total - 1) > reused:
                    reused = min(shared, total - 1) if self._restore(saved) else 0
            if self.bidirectional_image:
                reused = _image_boundary(pieces, reused)
            if reused < self.n_past:
                lib = self._llama_cpp
                if lib.llama_memory_seq_rm(lib.llama_get_memory(self._ctx), 0, reused, -1):
                    self.n_past = reused
                    del self._keys[reused:]
                else:  # this memory cannot drop part of a sequence (recurrent models)
                    self.reset()
                    reused = 0
            logits = self._decode(_skip(pieces, reused), total - reused, all_logits=False)
            if self.states is not None and wanted not in self.states:
                self._save()
        except BaseException:
            self.reset()  # never reuse a KV cache that a failure left half-changed
            raise
        return logits, reused

    def _save(self) -> None:
        """Keep a copy of the sequence's state (the prompt just decoded) in `states`."""
        lib = self._llama_cpp
        size = int(lib.llama_state_seq_get_size(self._ctx, 0))
        if size > self.states.max_bytes:
            return
        data = (ctypes.c_uint8 * size)()
        if int(lib.llama_state_seq_get_data(self._ctx, data, size, 0)) == size:
            self.states.put(self._keys, data)

    def _restore(self, keys: tuple[PositionKey, ...]) -> bool:
        """Load a saved state into seq 0 (llama.cpp drops the sequence's cells first)."""
        data = self.states.get(keys)
        lib = self._llama_cpp
        if int(lib.llama_state_seq_set_data(self._ctx, data, ctypes.sizeof(data), 0)) == 0:
            logger.warning("llama.cpp could not restore a saved prompt state; decoding it again")
            self.states.discard(keys)
            self.reset()
            return False
        self.n_past = len(keys)
        self._keys[:] = keys
        return True

    def eval_tokens(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        return self.eval([token_ids], all_logits)

    def eval_embeddings(self, embeds: np.ndarray, all_logits: bool = False) -> np.ndarray:
        return self.eval([np.asarray(embeds, dtype=np.float32)], all_logits)

    def generate_greedy(
        self, segments: Sequence[Segment], max_new_tokens: int, stop_ids: Sequence[int] = ()
    ) -> list[int]:
        """Greedy decoding after the segments; stops at a stop id (not returned) or the limit."""
        logits = self.eval(segments)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(np.argmax(logits))
            if token in stop_ids:
                break
            out.append(token)
            if self.n_past >= self.n_ctx:
                logger.warning("context of %d positions is full; generation stopped", self.n_ctx)
                break
            logits = self.eval([[token]])
        return out
