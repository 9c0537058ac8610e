"""LLM backends: a prompt of segments (token ids, and image embeddings where the image token was)
-> logits, one sequence at a time.

The contract is small so that decoding, sampling, stop handling and timing live once, in the
engine: `prefill(segments)` starts a new sequence and returns the last position's logits
(`LlamaCppBackend.prefill_reusing` also keeps the KV cache of a prefix shared with the previous
sequence; the engine uses it when a backend has it),
`step(token)` appends one token and returns the next logits, `score(segments, answer_ids)`
returns each answer token's log-probability (multiple choice, perplexity).

- `LlamaCppBackend`: a GGUF through `cxrlite.runtime.llamacpp.LlamaCppLLM` (embeddings enter through
  `llama_batch.embd`); GPU offload with `n_gpu_layers` when the llama.cpp build has it.
- `TorchLLMBackend`: a transformers LlamaForCausalLM with `inputs_embeds` and a KV cache: the
  PyTorch reference (`CXRVLM.llm`) or a GPTQ model (`cxrlite.runtime.gptq.load_gptq_llm`).

No backend is thread-safe (one KV cache each): the engine serializes them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cxrlite.bundle import Key
from cxrlite.runtime.sampling import log_softmax

logger = logging.getLogger(__name__)

Segment = Sequence[int] | np.ndarray  # token ids, or float32 [n, n_embd] embeddings


@runtime_checkable
class LLMBackend(Protocol):
    name: str  # the bundle variant ("gguf-q4_k_m", "gptq-4bit") or "torch-fp32"
    device: str
    n_ctx: int  # positions one sequence may use
    n_vocab: int
    n_past: int  # positions of the current sequence

    def prefill(self, segments: Sequence[Segment]) -> np.ndarray: ...

    def step(self, token_id: int) -> np.ndarray: ...

    def score(self, segments: Sequence[Segment], answer_ids: Sequence[int]) -> np.ndarray: ...

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
        )
        self.n_ctx, self.n_vocab = self.llm.n_ctx, self.llm.n_vocab
        self.settings = {"n_gpu_layers": n_gpu_layers, "kv_type": kv_type, "flash_attn": flash_attn}

    @property
    def n_past(self) -> int:
        return self.llm.n_past

    def prefill(self, segments: Sequence[Segment]) -> np.ndarray:
        self.llm.reset()
        return self.llm.eval(segments)

    def prefill_reusing(self, segments: Sequence[Segment]) -> tuple[np.ndarray, int]:
        """`prefill` that keeps the KV cache of the prefix shared with the current sequence
        (see LlamaCppLLM.eval_reusing): (last logits, positions reused)."""
        return self.llm.eval_reusing(segments)

    def clear_prefix_cache(self) -> None:
        """Forget the sequence and every saved prompt state: the next prefill starts cold."""
        self.llm.reset()
        if self.llm.states is not None:
            self.llm.states.clear()

    def step(self, token_id: int) -> np.ndarray:
        return self.llm.eval([[int(token_id)]])

    def score(self, segments: Sequence[Segment], answer_ids: Sequence[int]) -> np.ndarray:
        ids = _check_answer(answer_ids)
        rows = [self.prefill(segments)]
        if len(ids) > 1:
            rows.extend(self.llm.eval([ids[:-1]], all_logits=True))
        return _answer_logprobs(np.stack(rows), ids)

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
    )
