"""A whole request, timed phase by phase, on one LLM backend (one job per LLM variant).

Each run: decode the radiograph, preprocess, the default vision backend, prefill (prompt + image
embeddings; time to first token includes the image work before it), then exactly `max_tokens`
greedy tokens with EOS ignored: the backend's prefill/step API is driven directly, so every run
and every variant decodes the same number of tokens (tokens/s, inter-token latency, end to end).

Then the repeated image (`repeated_image`): time to first token through the runtime's own request
path (`Runtime.complete`, image bytes in, one token) cold, with the embedding cache and the LLM's
prompt-prefix cache emptied, then for the same image and prompt again (vision skipped, the
prompt's KV cache reused up to its last position) and for the same image with another question
(reused up to where the questions differ), with the positions reused.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.bench.backends import open_llm_spec, open_vision_spec
from cxrlite.bench.jobs import REPEAT_QUESTION, BenchError, ms, timed
from cxrlite.bench.memory import MemorySampler, mb
from cxrlite.data.prompts import FINDINGS_PROMPT

PHASES = ("decode_ms", "preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "e2e_ms")


def prompt_segments(bundle: Any, tokenizer: Any, embeds: np.ndarray) -> tuple[list[Any], int]:
    """The findings prompt as the runtime feeds it: ids before the image token, the image
    embeddings, ids after; and its length in positions."""
    from cxrlite.model.tokenizer import format_prompt

    cfg = bundle.config
    ids = tokenizer.encode(
        format_prompt(tokenizer, FINDINGS_PROMPT, True), add_special_tokens=False
    )
    at = ids.index(cfg.image_token_id)
    segments = [s for s in (ids[:at], embeds, ids[at + 1 :]) if len(s)]
    return segments, len(ids) - 1 + len(embeds)


def llm_job(job: dict[str, Any], bundle: Any, memory: MemorySampler, device: Any) -> dict[str, Any]:
    """Raw per-run figures of the LLM backend `job["spec"]` behind `job["vision"]`, and the memory
    opening each took."""
    from cxrlite.imaging.decode import load_image
    from cxrlite.imaging.preprocess import preprocess
    from cxrlite.model.tokenizer import load_tokenizer
    from cxrlite.runtime.engine import MAX_DEFAULT_CTX

    data = Path(job["image_file"]).read_bytes()
    tokenizer = load_tokenizer(bundle.tokenizer_dir)
    before = memory.sample()
    vision = open_vision_spec(
        bundle, job["vision"], job.get("threads"), job.get("checkpoint"), device=device
    )
    after_vision = memory.sample()
    cfg = bundle.config  # without n_ctx, the model's context as a runtime sizes it
    n_ctx = job.get("n_ctx") or min(cfg.llm.max_position_embeddings, MAX_DEFAULT_CTX)
    llm = open_llm_spec(
        bundle,
        job["spec"],
        n_ctx=n_ctx,
        threads=job.get("threads"),
        n_gpu_layers=job.get("n_gpu_layers"),
        checkpoint=job.get("checkpoint"),
        device=device,
    )
    after_llm = memory.sample()
    phases: dict[str, list[float]] = {k: [] for k in PHASES}
    phases.update(itl_ms=[], tokens_per_s=[], decode_total_ms=[])
    n_prompt = 0
    max_tokens = job["max_tokens"]
    for i in range(job["warmup"] + job["runs"]):
        start = time.perf_counter()
        image, t_decode = timed(load_image, data)
        pixels, t_pre = timed(preprocess, image.pixels, bundle.preprocess)
        embeds, t_vision = timed(vision.encode, pixels[None])
        segments, n_prompt = prompt_segments(bundle, tokenizer, embeds[0])
        if n_prompt + max_tokens > llm.n_ctx:
            raise BenchError(
                f"{n_prompt} prompt positions + {max_tokens} tokens exceed the context "
                f"of {llm.n_ctx}; lower --max-tokens or raise n_ctx"
            )
        t0 = time.perf_counter()
        logits = llm.prefill(segments)
        token = int(np.argmax(logits))  # greedy; EOS is not a stop here, so lengths are equal
        first = time.perf_counter()
        itl = []
        for _ in range(max_tokens - 1):
            t = time.perf_counter()
            token = int(np.argmax(llm.step(token)))
            itl.append(ms(time.perf_counter() - t))
        end = time.perf_counter()
        if i < job["warmup"]:
            continue
        decode_s = end - first
        phases["decode_ms"].append(t_decode)
        phases["preprocess_ms"].append(t_pre)
        phases["vision_ms"].append(t_vision)
        phases["prefill_ms"].append(ms(first - t0))
        phases["ttft_ms"].append(ms(first - start))
        phases["decode_total_ms"].append(ms(decode_s))
        phases["itl_ms"].extend(itl)
        if max_tokens > 1 and decode_s > 0:
            phases["tokens_per_s"].append((max_tokens - 1) / decode_s)
        phases["e2e_ms"].append(ms(end - start))
    if job.get("repeated_image", True):
        phases.update(repeated_image(job, bundle, vision, llm, tokenizer, data))
    llm.close()
    return {
        "name": llm.name,
        "device": llm.device,
        "vision": vision.name,
        "n_prompt": n_prompt,
        "n_ctx": llm.n_ctx,
        "max_tokens": max_tokens,
        "settings": getattr(llm, "settings", {}),
        "vision_load_delta_mb": mb(after_vision - before),
        "load_delta_mb": mb(after_llm - after_vision),
        **phases,
    }


def repeated_image(
    job: dict[str, Any], bundle: Any, vision: Any, llm: Any, tokenizer: Any, data: bytes
) -> dict[str, Any]:
    """TTFT cold vs repeated image through Runtime.complete (see the module docstring)."""
    from cxrlite.runtime.cache import EmbeddingCache
    from cxrlite.runtime.engine import Runtime

    runtime = Runtime(bundle, vision, llm, tokenizer, cache=EmbeddingCache())
    forget = getattr(llm, "clear_prefix_cache", None)  # backends without one never reuse
    ttft: dict[str, list[float]] = {"cold": [], "same": [], "other": []}
    cached: dict[str, int] = {}
    for i in range(job["warmup"] + job["runs"]):
        runtime.cache.clear()
        if forget is not None:
            forget()
        runs = {
            "cold": runtime.complete(FINDINGS_PROMPT, data, max_tokens=1),
            "same": runtime.complete(FINDINGS_PROMPT, data, max_tokens=1),
            "other": runtime.complete(REPEAT_QUESTION, data, max_tokens=1),
        }
        if i < job["warmup"]:
            continue
        for name, completion in runs.items():
            ttft[name].append(completion.timings["ttft_ms"])
            cached[name] = int(completion.timings.get("prompt_cached_tokens", 0))
    return {
        "repeat_cold_ttft_ms": ttft["cold"],
        "repeat_same_ttft_ms": ttft["same"],
        "repeat_other_ttft_ms": ttft["other"],
        "repeat_cached_tokens": cached,
    }
