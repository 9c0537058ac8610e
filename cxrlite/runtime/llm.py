"""LLM backends: prompts of segments (token ids, and image embeddings where the image token was)
-> logits, for the decode engine (cxrlite.runtime.batching) that batches sequences over slots.

The engine's contract (`LLMBackend`): `parse(segments)` validates a prompt into pieces,
`prepare(slot, ...)` keeps the KV cache of a prefix the slot already holds and drops the rest,
`decode(items)` appends positions to several slots at once and returns the logits asked for.
Decoding, sampling, stop handling and timing live once, in the engine and `Generation`.

- `LlamaCppBackend`: a GGUF through `cxrlite.runtime.llamacpp.LlamaCppLLM`, `slots` sequences
  decoded together, prefills chunked (embeddings enter through `llama_batch.embd`); GPU offload
  with `n_gpu_layers` when the llama.cpp build has it.
- `TorchLLMBackend`: a transformers causal LM with `inputs_embeds` and a KV cache: the PyTorch
  reference (`CXRVLM.llm`) or a GPTQ model (`cxrlite.runtime.gptq.load_gptq_llm`); one slot, the
  prompt in one forward.

`prefill(segments)` and `step(token)` run one sequence directly (phase benchmarks, parity tests).
No backend is thread-safe: only the engine's thread decodes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cxrlite.bundle import Key
from cxrlite.runtime.positions import DecodeItem, Piece, PositionKey, Segment, pieces_of
from cxrlite.runtime.sampling import log_softmax

logger = logging.getLogger(__name__)


@runtime_checkable
class LLMBackend(Protocol):
    name: str  # the bundle variant ("gguf-q4_k_m", "gptq-4bit") or "torch-fp32"
    device: str
    n_ctx: int  # positions one sequence may use
    n_vocab: int
    slots: int  # sequences decoded together
    n_batch: int  # rows one decode may hold
    chunked: bool  # a prompt may be decoded in parts, between other sequences' steps
    bidirectional_image: bool

    def parse(self, segments: Sequence[Segment]) -> tuple[list[Piece], int]: ...

    def prepare(
        self, seq: int, pieces: list[Piece], total: int, reuse: bool, limit: int
    ) -> int: ...

    def shared_prefix(self, seq: int, wanted: Sequence[PositionKey]) -> int: ...

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray | None]: ...

    def seq_len(self, seq: int) -> int: ...

    def save_state(self, seq: int) -> None: ...

    def forget(self, seq: int) -> None: ...

    def prefill(self, segments: Sequence[Segment]) -> np.ndarray: ...

    def step(self, token_id: int) -> np.ndarray: ...

    def close(self) -> None: ...


def _answer_logprobs(logits: np.ndarray, answer_ids: Sequence[int]) -> np.ndarray:
    """logits [n, vocab] of the positions before each answer token -> their log-probabilities."""
    logp = log_softmax(logits)
    return logp[np.arange(len(answer_ids)), np.asarray(answer_ids, dtype=np.int64)]


def _check_answer(answer_ids: Sequence[int]) -> list[int]:
    ids = [int(t) for t in answer_ids]
    if not ids:
        raise ValueError("score needs at least one answer token")
    return ids


class LlamaCppBackend:
    def __init__(
        self,
        gguf_path: str | os.PathLike,
        name: str,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        kv_type: str = "f16",
        flash_attn: bool | None = None,
        state_cache_bytes: int | None = None,
        slots: int = 1,
        n_batch: int = 512,
        batch_invariant: bool = True,
    ) -> None:
        from cxrlite.runtime.llamacpp import (
            DEFAULT_STATE_CACHE_BYTES,
            LlamaCppLLM,
            import_llama_cpp,
        )

        if n_gpu_layers and not import_llama_cpp().llama_supports_gpu_offload():
            logger.warning("this llama.cpp build has no GPU offload; running on the CPU")
            n_gpu_layers = 0
        self.name = name
        self.device = "cuda" if n_gpu_layers else "cpu"
        self.llm = LlamaCppLLM(
            gguf_path,
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_gpu_layers=n_gpu_layers,
            kv_type=kv_type,
            flash_attn=flash_attn,
            state_cache_bytes=(
                DEFAULT_STATE_CACHE_BYTES if state_cache_bytes is None else state_cache_bytes
            ),
            n_seq=slots,
            n_batch=n_batch,
            batch_invariant=batch_invariant,
        )
        llm = self.llm
        self.n_ctx, self.n_vocab, self.n_batch = llm.n_ctx, llm.n_vocab, llm.n_batch
        self.slots, self.bidirectional_image = llm.n_seq, llm.bidirectional_image
        self.threads = llm.n_threads
        self.settings = {
            "n_gpu_layers": n_gpu_layers, "kv_type": kv_type, "flash_attn": flash_attn,
            "slots": self.slots, "threads": self.threads, "batch_invariant": batch_invariant,
        }  # fmt: skip
        # The engine's contract, straight through to LlamaCppLLM.
        self.parse, self.shared_prefix, self.decode = llm.parse, llm.shared_prefix, llm.decode
        self.seq_len, self.save_state, self.forget = llm.seq_len, llm.save_state, llm.forget

    chunked = True

    @property
    def n_past(self) -> int:
        return self.llm.n_past

    def prepare(self, seq: int, pieces: list[Piece], total: int, reuse: bool, limit: int) -> int:
        return self.llm.prepare(seq, pieces, total, reuse, limit)

    def prefill(self, segments: Sequence[Segment]) -> np.ndarray:
        self.llm.forget(0)
        return self.llm.eval(segments)

    def clear_prefix_cache(self) -> None:
        """Forget the sequence and every saved prompt state: the next prefill starts cold."""
        self.llm.reset()
        if self.llm.states is not None:
            self.llm.states.clear()

    def step(self, token_id: int) -> np.ndarray:
        return self.llm.eval([[int(token_id)]])

    def close(self) -> None:
        self.llm.close()


class TorchLLMBackend:
    """A transformers causal LM fed `inputs_embeds` (text embeddings from its own table, image
    embeddings as given), with its KV cache kept between `step`s."""

    def __init__(self, llm: Any, name: str, n_ctx: int | None = None) -> None:
        import torch

        self._torch = torch
        self.llm, self.name = llm.eval(), name
        self._table = llm.get_input_embeddings()
        self.dtype = self._table.weight.dtype
        self.device = self._table.weight.device.type
        config = llm.config
        self.n_ctx = n_ctx or int(config.max_position_embeddings)
        self.n_vocab = int(config.vocab_size)
        self._past: Any = None
        self.n_past = 0
        self.n_batch = self.n_ctx  # the prompt goes in one forward

    # One slot, the prompt whole (Gemma 3's image masks are built over the whole prompt), no
    # prefix reuse: the reference and GPTQ paths favour simplicity over serving speed.
    slots = 1
    chunked = False
    bidirectional_image = False

    def parse(self, segments: Sequence[Segment]) -> tuple[list[Piece], int]:
        pieces = pieces_of(segments)
        total = sum(len(piece) for piece in pieces)
        if total == 0:
            raise ValueError("nothing to decode: all segments are empty")
        for piece in pieces:
            if piece.embeds is not None and piece.embeds.shape[1:] != (self._table.embedding_dim,):
                raise ValueError(
                    f"embeddings must be [n, {self._table.embedding_dim}], got {piece.embeds.shape}"
                )
            if piece.tokens is not None and not all(0 <= t < self.n_vocab for t in piece.tokens):
                raise ValueError(f"token id outside the vocabulary ({self.n_vocab})")
        return pieces, total

    def prepare(self, seq: int, pieces: list[Piece], total: int, reuse: bool, limit: int) -> int:
        if total > self.n_ctx:
            raise ValueError(f"{total} positions exceed the context of {self.n_ctx}")
        self.forget(seq)
        return 0

    def shared_prefix(self, seq: int, wanted: Sequence[PositionKey]) -> int:
        return 0

    def seq_len(self, seq: int) -> int:
        return self.n_past

    def save_state(self, seq: int) -> None:
        pass

    def forget(self, seq: int) -> None:
        self._past, self.n_past = None, 0

    def decode(self, items: Sequence[DecodeItem]) -> list[np.ndarray | None]:
        """A whole prompt (every item, in order) as one forward, or one generated token."""
        if self.n_past:
            (item,) = items
            return [self.step(item.piece.tokens[0])[None]]
        segments = [
            p.tokens if p.tokens is not None else p.embeds for p in (i.piece for i in items)
        ]
        with self._torch.no_grad():
            embeds, image = self._embeds(segments)
            out = self._forward(embeds, image, use_cache=True)
        self._past, self.n_past = out.past_key_values, int(embeds.shape[1])
        rows, start, logits = [], 0, out.logits[0]
        for item in items:
            if item.logits_from is None:
                rows.append(None)
            else:
                part = logits[start + item.logits_from : start + len(item.piece)]
                rows.append(part.float().cpu().numpy())
            start += len(item.piece)
        return rows

    def _embeds(self, segments: Sequence[Segment]) -> tuple[Any, Any]:
        """The prompt's input embeddings [1, T, D] and which positions hold an image [1, T]."""
        torch = self._torch
        parts, image = [], []
        for segment in segments:
            if isinstance(segment, np.ndarray) and segment.dtype.kind == "f":
                if segment.ndim != 2 or segment.shape[1] != self._table.embedding_dim:
                    raise ValueError(
                        f"embeddings must be [n, {self._table.embedding_dim}], got {segment.shape}"
                    )
                embeds = torch.tensor(np.asarray(segment, dtype=np.float32))
                parts.append(embeds.to(self.device, self.dtype))
                image.append(torch.ones(len(embeds), dtype=torch.bool))
            elif len(segment):
                ids = torch.tensor([int(t) for t in segment], dtype=torch.long)
                if int(ids.min()) < 0 or int(ids.max()) >= self.n_vocab:
                    raise ValueError(f"token id outside the vocabulary ({self.n_vocab})")
                parts.append(self._table(ids.to(self.device)))
                image.append(torch.zeros(len(ids), dtype=torch.bool))
        if not parts:
            raise ValueError("nothing to decode: all segments are empty")
        embeds = torch.cat(parts).unsqueeze(0)
        if embeds.shape[1] > self.n_ctx:
            raise ValueError(f"{embeds.shape[1]} positions exceed the context of {self.n_ctx}")
        return embeds, torch.cat(image).unsqueeze(0).to(self.device)

    def _forward(self, embeds: Any, image: Any, use_cache: bool = False) -> Any:
        """The LLM on a prompt, its image attended to as the model family does (both ways in
        Gemma 3, built from transformers' own masks)."""
        from cxrlite.model.language import image_attention_masks

        masks = image_attention_masks(self.llm, embeds, image)
        return self.llm(inputs_embeds=embeds, attention_mask=masks, use_cache=use_cache)

    def _last_logits(self, out: Any) -> np.ndarray:
        return out.logits[0, -1].float().cpu().numpy()

    def prefill(self, segments: Sequence[Segment]) -> np.ndarray:
        with self._torch.no_grad():
            embeds, image = self._embeds(segments)
            out = self._forward(embeds, image, use_cache=True)
        self._past, self.n_past = out.past_key_values, int(embeds.shape[1])
        return self._last_logits(out)

    def step(self, token_id: int) -> np.ndarray:
        torch = self._torch
        if self._past is None:
            raise RuntimeError("step before prefill")
        if self.n_past >= self.n_ctx:
            raise ValueError(f"the context of {self.n_ctx} positions is full")
        ids = torch.tensor([[int(token_id)]], device=self.device)
        with torch.no_grad():
            out = self.llm(input_ids=ids, cache=self._past, use_cache=True)
        self._past, self.n_past = out.past_key_values, self.n_past + 1
        return self._last_logits(out)

    def score(self, segments: Sequence[Segment], answer_ids: Sequence[int]) -> np.ndarray:
        ids = _check_answer(answer_ids)
        self._past, self.n_past = None, 0
        with self._torch.no_grad():
            embeds, image = self._embeds([*segments, ids[:-1]])
            logits = self._forward(embeds, image).logits[0, -len(ids) :].float().cpu().numpy()
        return _answer_logprobs(logits, ids)

    def close(self) -> None:
        self._past = None


def open_llm(
    bundle: Any,
    choice: Any,
    *,
    n_ctx: int,
    threads: int | None = None,
    n_gpu_layers: int = 0,
    kv_type: str = "f16",
    flash_attn: bool | None = None,
    reference_llm: Any = None,
    device: Any = None,
    slots: int = 1,
    batch_invariant: bool = True,
) -> LLMBackend:
    """The backend for a plan `Choice` (cxrlite.runtime.plan); `reference_llm` is the reference
    model's LLM for the torch backend; a GPTQ model loads on `device` (a torch device)."""
    if choice.backend == "torch":
        if reference_llm is None:
            raise ValueError("the torch LLM backend needs the reference model")
        return TorchLLMBackend(reference_llm, "torch-fp32", n_ctx=n_ctx)
    path = bundle.variant_file(Key.LLM, choice.variant)
    if choice.backend == "gptq":
        from cxrlite.runtime.gptq import load_gptq_llm

        if device is None:
            raise ValueError("the GPTQ backend needs a torch device (cxrlite.device)")
        return TorchLLMBackend(load_gptq_llm(path, device=device), choice.variant, n_ctx=n_ctx)
    return LlamaCppBackend(
        path,
        choice.variant,
        n_ctx=n_ctx,
        n_threads=threads,
        n_gpu_layers=n_gpu_layers,
        kv_type=kv_type,
        flash_attn=flash_attn,
        slots=slots,
        batch_invariant=batch_invariant,
    )
