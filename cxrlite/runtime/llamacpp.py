"""Run a GGUF through llama-cpp-python's low-level API, with token ids and embeddings, several
sequences at once.

The high-level `llama_cpp.Llama` class takes text or token ids only. Image embeddings have to enter
as rows of `llama_batch.embd` (a batch made by `llama_batch_init(n, n_embd, 1)`), so this wraps
the C API directly: one model, one context with `n_seq` sequences (slots), each with its own KV
cells (`kv_unified` off: a sequence attends over its own cells only) and `n_ctx` positions. A
prompt is a list of segments, each either token ids or a float32 [n, n_embd] array, decoded in
order into a sequence's cache, which is how "<s>USER: <image x N>\\n question ASSISTANT:" is fed.
Runtimes feed our own token ids: llama.cpp's tokenizer may split text around special tokens
differently from ours.

`decode(items)` appends positions to several sequences in one `llama_decode` (what continuous
batching in cxrlite.runtime.batching is built on); `eval`, `eval_reusing` and `generate_greedy`
run one sequence (seq 0 unless told) the simple way.

Prompt-prefix reuse (`prepare`, `eval_reusing`, what llama.cpp's server calls `cache_prompt`): the
object remembers one key per decoded position of each sequence (cxrlite.runtime.positions), so a
new prompt that starts like a sequence (the same image and chat text, a follow-up turn) drops
only the KV cache past the shared prefix and decodes the rest. With `state_cache_bytes`, copies of
recent prompts' KV caches (`SequenceStates`, a bounded LRU shared by the sequences) let studies
asked about in turn reuse theirs although a sequence holds one prompt at a time.

Gemma 3 lets an image's tokens attend to each other both ways: for a GGUF of such a family
(`LLM_FAMILIES`) an embedding piece is decoded with causal attention off, whole and alone in its
batch, as llama.cpp's own multimodal library (mtmd) decodes image embeddings.

llama.cpp's log lines go to the `cxrlite.llama_cpp` logger (DEBUG, warnings and errors at their
level) instead of stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.errors import CxrliteError
from cxrlite.model.config import LLM_FAMILIES
from cxrlite.runtime.positions import (
    DecodeItem,
    Piece,
    PositionKey,
    Segment,
    SequenceStates,
    common_prefix_length,
    embedding_keys,
    image_boundary,
    skip,
    token_piece,
)

logger = logging.getLogger(__name__)
native_logger = logging.getLogger("cxrlite.llama_cpp")

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
    """One GGUF model with one context of `n_seq` sequences (seq ids 0 .. n_seq - 1), each of
    `n_ctx` positions.

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
        n_seq: int = 1,
        batch_invariant: bool = True,
    ) -> None:
        self._llama_cpp = lib = import_llama_cpp()
        self.path = Path(gguf_path)
        self._model = self._ctx = None
        self._token_batch = self._embd_batch = None
        if not self.path.is_file():
            raise LlamaCppError(f"{self.path}: GGUF file not found")
        if kv_type not in KV_TYPES:
            raise LlamaCppError(f"kv_type must be one of {sorted(KV_TYPES)}, got {kv_type!r}")
        if not 1 <= n_seq <= int(lib.llama_max_parallel_sequences()):
            raise LlamaCppError(
                f"n_seq must be 1 .. {int(lib.llama_max_parallel_sequences())}, got {n_seq}"
            )
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = n_gpu_layers
        # Batch invariance: no CPU weight repacking. Repacked layouts take a GEMM kernel for
        # several rows and a GEMV for one, which round differently, so a sequence's tokens would
        # depend on what else shares its decode step. With the plain layout every row takes the
        # same kernel: a request's output is the same alone or batched (the same study gives
        # the same draft under any load), for slower single-sequence decoding on some CPUs.
        model_params.use_extra_bufts = not batch_invariant
        self._model = lib.llama_model_load_from_file(str(self.path).encode(), model_params)
        if not self._model:
            raise LlamaCppError(f"{self.path}: llama.cpp could not load this GGUF (see DEBUG log)")
        vocab = lib.llama_model_get_vocab(self._model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(vocab))
        self.n_embd = int(lib.llama_model_n_embd(self._model))
        self.n_threads = n_threads or os.cpu_count() or 1
        self._ctx = lib.llama_init_from_model(
            self._model, self._context_params(n_ctx, n_batch, n_seq, kv_type, flash_attn)
        )
        if not self._ctx:
            self.close()
            raise LlamaCppError(
                f"{self.path}: could not create a llama.cpp context (n_ctx={n_ctx} x {n_seq})"
            )
        # llama.cpp rounds n_ctx up (to 256) and caps n_batch at it; use what it really made,
        # since a batch larger than its n_batch aborts the process instead of returning an error.
        self.n_seq = n_seq
        self.n_ctx = int(lib.llama_n_ctx_seq(self._ctx))
        self.n_batch = min(n_batch, int(lib.llama_n_batch(self._ctx)))
        self.arch = self.metadata("general.architecture") or ""
        self.bidirectional_image = self.arch in _BIDIRECTIONAL_IMAGE_ARCHS
        # n_seq_max 1 per row: a row belongs to one sequence (no shared prompt rows)
        self._token_batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._embd_batch = lib.llama_batch_init(self.n_batch, self.n_embd, 1)
        # What each sequence's KV cache holds, one key per position: prefix reuse compares a new
        # prompt with it, and len(self._keys[seq]) is the sequence's next position.
        self._keys: list[list[PositionKey]] = [[] for _ in range(n_seq)]
        # Saved prompt states for prefix reuse (0 bytes: none kept).
        self.states = SequenceStates(state_cache_bytes) if state_cache_bytes else None

    def _context_params(
        self, n_ctx: int, n_batch: int, n_seq: int, kv_type: str, flash_attn: bool | None
    ) -> Any:
        params = self._llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * n_seq
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        # One KV stream per sequence: a sequence attends over its own n_ctx cells only, and a
        # full sequence can never take another's cells.
        params.kv_unified = False
        params.n_threads = params.n_threads_batch = self.n_threads
        params.type_k = params.type_v = KV_TYPES[kv_type]
        # llama_flash_attn_type: -1 auto (on for CPU), 0 off, 1 on. Its CPU kernel rounds through
        # f16 (~1e-3 on the logits); off gives the exact f32 path for parity checks.
        params.flash_attn_type = -1 if flash_attn is None else int(flash_attn)
        return params

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

    @property
    def n_past(self) -> int:
        """Positions of sequence 0 (the one the single-sequence methods use)."""
        return len(self._keys[0])

    def seq_len(self, seq: int) -> int:
        return len(self._keys[seq])

    def position_keys(self, seq: int = 0) -> list[PositionKey]:
        return list(self._keys[seq])

    def reset(self) -> None:
        """Forget every sequence: clear the KV cache; each starts again at position 0."""
        lib = self._llama_cpp
        lib.llama_memory_clear(lib.llama_get_memory(self._ctx), True)
        for keys in self._keys:
            keys.clear()

    def forget(self, seq: int) -> None:
        """Forget one sequence (its KV cells freed; it starts again at position 0)."""
        lib = self._llama_cpp
        if not lib.llama_memory_seq_rm(lib.llama_get_memory(self._ctx), seq, 0, -1):
            self.reset()  # this memory cannot drop a sequence alone (recurrent models)
        self._keys[seq].clear()

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

    # --- prompts -----------------------------------------------------------------------------

    def parse(self, segments: Sequence[Segment]) -> tuple[list[Piece], int]:
        """Segments as pieces with their position keys, validated before any decode so that bad
        input never leaves a half-appended sequence behind."""
        pieces: list[Piece] = []
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
                pieces.append(Piece(None, embeds, embedding_keys(embeds)))
            elif len(segment):
                piece = token_piece(segment)
                for token in piece.tokens:
                    if not 0 <= token < self.n_vocab:
                        raise LlamaCppError(
                            f"token id {token} is outside the vocabulary ({self.n_vocab})"
                        )
                pieces.append(piece)
        total = sum(len(piece) for piece in pieces)
        if total == 0:
            raise LlamaCppError("nothing to decode: all segments are empty")
        return pieces, total

    def shared_prefix(self, seq: int, wanted: Sequence[PositionKey]) -> int:
        """How many leading positions of `wanted` the sequence already holds."""
        return common_prefix_length(self._keys[seq], wanted)

    def prepare(
        self,
        seq: int,
        pieces: list[Piece],
        total: int,
        reuse: bool = True,
        limit: int | None = None,
    ) -> int:
        """Make the sequence hold the longest prefix of `pieces` it can keep (its own cells, or
        a saved state; none without `reuse`), dropping the rest; the number of positions kept.
        The last position is never kept, since its logits are needed, nor any past `limit`."""
        if total > self.n_ctx:
            raise LlamaCppError(
                f"{total} positions exceed the context of {self.n_ctx}; "
                "raise n_ctx or shorten the prompt"
            )
        if not reuse:
            self.forget(seq)
            return 0
        wanted = [key for piece in pieces for key in piece.keys]
        last = total - 1 if limit is None else min(limit, total - 1)
        try:
            kept = min(self.shared_prefix(seq, wanted), last)
            if self.states is not None:
                saved, shared = self.states.best(wanted)
                if min(shared, last) > kept:
                    kept = min(shared, last) if self._restore(saved, seq) else 0
            if self.bidirectional_image:
                kept = image_boundary(pieces, kept)
            if kept < self.seq_len(seq):
                lib = self._llama_cpp
                if lib.llama_memory_seq_rm(lib.llama_get_memory(self._ctx), seq, kept, -1):
                    del self._keys[seq][kept:]
                else:  # this memory cannot drop part of a sequence (recurrent models)
                    self.forget(seq)
                    kept = 0
        except BaseException:
            self.forget(seq)  # never reuse a KV cache that a failure left half-changed
            raise
        return kept

    def save_state(self, seq: int) -> None:
        """Keep a copy of the sequence's state (the prompt just decoded) in `states`."""
        if self.states is None or self._keys[seq] in self.states:
            return
        lib = self._llama_cpp
        size = int(lib.llama_state_seq_get_size(self._ctx, seq))
        if size > self.states.max_bytes:
            return
        data = (ctypes.c_uint8 * size)()
        if int(lib.llama_state_seq_get_data(self._ctx, data, size, seq)) == size:
            self.states.put(self._keys[seq], data)

    def _restore(self, keys: tuple[PositionKey, ...], seq: int) -> bool:
        """Load a saved state into a sequence (llama.cpp drops the sequence's cells first)."""
        data = self.states.get(keys)
        lib = self._llama_cpp
        if int(lib.llama_state_seq_set_data(self._ctx, data, ctypes.sizeof(data), seq)) == 0:
            logger.warning("llama.cpp could not restore a saved prompt state; decoding it again")
            self.states.discard(keys)
            self.forget(seq)
            return False
        self._keys[seq][:] = keys
        return True

    # --- decoding ----------------------------------------------------------------------------

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray | None]:
        """Append each item's positions to its sequence (one item per sequence), in as few
        `llama_decode` calls as llama.cpp allows: token rows together, embedding rows together
        (an image of a bidirectional family alone, with causal attention off). Returns each
        item's logits [rows from logits_from, n_vocab], or None. On a failed decode the items'
        sequences are forgotten (their cache is in a state no key list describes) and
        LlamaCppError is raised."""
        tokens = [i for i, item in enumerate(items) if item.piece.tokens is not None]
        embeds = [i for i, item in enumerate(items) if item.piece.embeds is not None]
        groups = [tokens] if tokens else []
        if embeds:
            groups += [[i] for i in embeds] if self.bidirectional_image else [embeds]
        out: list[np.ndarray | None] = [None] * len(items)
        try:
            for group in groups:
                rows = self._decode_group([items[i] for i in group])
                for i, logits in zip(group, rows, strict=True):
                    out[i] = logits
        except BaseException:
            for item in items:
                self.forget(item.seq)
            raise
        return out

    def _decode_group(self, items: Sequence[DecodeItem]) -> list[np.ndarray | None]:
        embeddings = items[0].piece.embeds is not None
        batch = self._embd_batch if embeddings else self._token_batch
        n = 0
        for item in items:
            start, size = self.seq_len(item.seq), len(item.piece)
            if start + size > self.n_ctx:
                raise LlamaCppError(
                    f"{start} + {size} positions exceed the context of {self.n_ctx}; "
                    "raise n_ctx or shorten the prompt"
                )
            if n + size > self.n_batch:
                raise LlamaCppError(f"a batch of more than {self.n_batch} rows")
            if embeddings:
                row_bytes = self.n_embd * ctypes.sizeof(ctypes.c_float)
                address = ctypes.cast(batch.embd, ctypes.c_void_p).value + n * row_bytes
                ctypes.memmove(address, item.piece.embeds.ctypes.data, item.piece.embeds.nbytes)
            for j in range(size):
                if not embeddings:
                    batch.token[n + j] = item.piece.tokens[j]
                batch.pos[n + j] = start + j
                batch.n_seq_id[n + j] = 1
                batch.seq_id[n + j][0] = item.seq
                wanted = item.logits_from is not None and j >= item.logits_from
                batch.logits[n + j] = 1 if wanted else 0
            n += size
        batch.n_tokens = n
        status = self._llama_decode(batch, non_causal=embeddings and self.bidirectional_image)
        if status != 0:
            raise LlamaCppError(
                f"llama_decode failed with status {status} at position {self.seq_len(items[0].seq)}"
            )
        # llama.cpp keeps the rows that asked for logits contiguous, in batch order.
        n_out = sum(len(i.piece) - i.logits_from for i in items if i.logits_from is not None)
        logits = np.ctypeslib.as_array(
            self._llama_cpp.llama_get_logits(self._ctx), shape=(n_out, self.n_vocab)
        ) if n_out else None  # fmt: skip
        out: list[np.ndarray | None] = []
        row = 0
        for item in items:
            self._keys[item.seq].extend(item.piece.keys)
            if item.logits_from is None:
                out.append(None)
                continue
            rows = len(item.piece) - item.logits_from
            out.append(np.array(logits[row : row + rows]))  # a copy: the next decode reuses it
            row += rows
        return out

    def _llama_decode(self, batch: Any, non_causal: bool) -> int:
        lib = self._llama_cpp
        if non_causal:
            lib.llama_set_causal_attn(self._ctx, False)
        try:
            return int(lib.llama_decode(self._ctx, batch))
        finally:
            if non_causal:
                lib.llama_set_causal_attn(self._ctx, True)

    def _decode(
        self, pieces: list[Piece], total: int, all_logits: bool, seq: int = 0
    ) -> np.ndarray:
        """One sequence's pieces in batches of n_batch rows."""
        if self.seq_len(seq) + total > self.n_ctx:
            raise LlamaCppError(
                f"{self.seq_len(seq)} + {total} positions exceed the context of {self.n_ctx}; "
                "raise n_ctx or shorten the prompt"
            )
        outputs: list[np.ndarray] = []
        done = 0
        for piece in pieces:
            for start in range(0, len(piece), self.n_batch):
                chunk = piece.slice(start, min(start + self.n_batch, len(piece)))
                done += len(chunk)
                want = 0 if all_logits else (len(chunk) - 1 if done == total else None)
                (logits,) = self.decode([DecodeItem(seq, chunk, want)])
                if logits is not None:
                    outputs.append(logits)
        stacked = np.concatenate(outputs)
        return stacked if all_logits else stacked[-1]

    def eval(
        self, segments: Sequence[Segment], all_logits: bool = False, seq: int = 0
    ) -> np.ndarray:
        """Append the segments to a sequence; return the last position's logits [n_vocab], or
        with `all_logits` those of every appended position [n, n_vocab]. Bad input raises before
        anything is decoded; a failed decode forgets the sequence."""
        pieces, total = self.parse(segments)
        return self._decode(pieces, total, all_logits, seq)

    def eval_reusing(self, segments: Sequence[Segment], seq: int = 0) -> tuple[np.ndarray, int]:
        """Make the sequence exactly `segments`, keeping the KV cache of the longest prefix it
        shares with what is already decoded or saved (llama.cpp server's `cache_prompt`):
        returns the last position's logits and how many positions were reused. The last
        position is always decoded again, since its logits are needed."""
        pieces, total = self.parse(segments)
        reused = self.prepare(seq, pieces, total)
        logits = self._decode(skip(pieces, reused), total - reused, all_logits=False, seq=seq)
        self.save_state(seq)
        return logits, reused

    def eval_tokens(self, token_ids: Sequence[int], all_logits: bool = False) -> np.ndarray:
        return self.eval([token_ids], all_logits)

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
