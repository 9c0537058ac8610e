"""Run a llama GGUF through llama-cpp-python's low-level API, with token ids and embeddings.

The high-level `llama_cpp.Llama` class takes text or token ids only. Image embeddings have to enter
as rows of `llama_batch.embd` (a batch made by `llama_batch_init(n, n_embd, 1)`), so this wraps
the C API directly: one model, one context, one sequence, and a position counter. A prompt is a
list of segments, each either token ids or a float32 [n, n_embd] array; segments are decoded in
order into the same KV cache, which is how "<s>USER: <image x N>\\n question ASSISTANT:" is fed.
Runtimes feed our own token ids: llama.cpp's tokenizer may split text around special tokens
differently from ours.

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

logger = logging.getLogger(__name__)
native_logger = logging.getLogger("cxrlite.llama_cpp")

Segment = Sequence[int] | np.ndarray

_init_lock = threading.Lock()
_initialised = False
_log_callback: Any = None  # kept alive: llama.cpp holds a raw pointer to it


# KV cache element types (ggml_type); "f32" (with flash_attn=False) is for parity checks.
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}


class LlamaCppError(RuntimeError):
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
        self._token_batch = lib.llama_batch_init(n_batch, 0, 1)
        self._embd_batch = lib.llama_batch_init(n_batch, self.n_embd, 1)
        self.n_past = 0

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

    def _decode_chunk(self, tokens: Sequence[int] | None, embeds: np.ndarray | None, want: bool):
        lib = self._llama_cpp
        n = len(tokens) if tokens is not None else embeds.shape[0]
        batch = self._token_batch if tokens is not None else self._embd_batch
        if tokens is not None:
            for i, token in enumerate(tokens):
                if not 0 <= token < self.n_vocab:
                    raise LlamaCppError(
                        f"token id {token} is outside the vocabulary ({self.n_vocab})"
                    )
                batch.token[i] = int(token)
        else:
            ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
        for i in range(n):
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1 if want else 0
        batch.n_tokens = n
        status = lib.llama_decode(self._ctx, batch)
        if status != 0:
            raise LlamaCppError(
                f"llama_decode failed with status {status} at position {self.n_past}"
            )
        self.n_past += n

    def _logits(self, index: int) -> np.ndarray:
        pointer = self._llama_cpp.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).copy()

    def eval(self, segments: Sequence[Segment], all_logits: bool = False) -> np.ndarray:
        """Append the segments to the sequence; return the last position's logits [n_vocab], or
        with `all_logits` those of every appended position [n, n_vocab]."""
        pieces: list[tuple[Sequence[int] | None, np.ndarray | None]] = []
        total = 0
        for segment in segments:
            if isinstance(segment, np.ndarray) and segment.dtype.kind == "f":
                embeds = np.ascontiguousarray(segment, dtype=np.float32)
                if embeds.ndim != 2 or embeds.shape[1] != self.n_embd:
                    raise LlamaCppError(
                        f"embeddings must be [n, {self.n_embd}] float32, got {tuple(segment.shape)}"
                    )
                pieces.append((None, embeds))
                total += embeds.shape[0]
            else:
                tokens = [int(t) for t in segment]
                pieces.append((tokens, None))
                total += len(tokens)
        if total == 0:
            raise LlamaCppError("nothing to decode: all segments are empty")
        if self.n_past + total > self.n_ctx:
            raise LlamaCppError(
                f"{self.n_past} + {total} positions exceed the context of {self.n_ctx}; "
                "raise n_ctx or shorten the prompt"
            )
        outputs: list[np.ndarray] = []
        done = 0
        for tokens, embeds in pieces:
            n = len(tokens) if tokens is not None else embeds.shape[0]
            for start in range(0, n, self.n_batch):
                stop = min(start + self.n_batch, n)
                last = done + stop == total
                want = all_logits or last
                chunk_tokens = tokens[start:stop] if tokens is not None else None
                chunk_embeds = embeds[start:stop] if embeds is not None else None
                self._decode_chunk(chunk_tokens, chunk_embeds, want)
                if all_logits:
                    outputs.extend(self._logits(i) for i in range(stop - start))
                elif last:
                    outputs.append(self._logits(stop - start - 1))
            done += n
        return np.stack(outputs) if all_logits else outputs[-1]

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
