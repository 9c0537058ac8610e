"""Prompt-prefix KV reuse in the llama.cpp backend: identical outputs with and without it, the
number of reused positions, recovery after a failed decode, and the bounded LRU of saved states."""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest
from runtime_testkit import random_pixels

from cxrlite.data.prompts import FINDINGS_PROMPT
from cxrlite.runtime import Runtime, TorchLLMBackend
from cxrlite.runtime.llamacpp import LlamaCppError
from cxrlite.runtime.positions import SequenceStates

QUESTION = "Is there a pleural effusion?"
TOKENS = 12  # generated per request: enough for a varied text, short enough to stay cheap


@pytest.fixture(scope="module")
def rt(runtime_built):
    _, _, bundle = runtime_built
    # The production settings (f16 KV cache, flash attention): the harder case for identical
    # outputs, since reused and recomputed KV rows come from batches of different sizes.
    runtime = Runtime.from_bundle(bundle, threads=1)
    yield runtime
    runtime.close()


def positions(rt: Runtime, prompt: str, image_id: int) -> list:
    """The prompt as the sequence of positions the LLM sees, the image token expanded to one
    entry per embedding row (`image_id` tells images apart)."""
    out: list = []
    for token in rt.prompt_ids(prompt, with_image=True):
        if token == rt.image_token_id:
            out += [("image", image_id, row) for row in range(rt.config.n_image_tokens)]
        else:
            out.append(token)
    return out


def shared_prefix(a: list, b: list) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def cold(rt: Runtime, prompt: str, pixels: np.ndarray):
    return rt.complete(prompt, pixels, max_tokens=TOKENS, prefix_cache=False)


def test_outputs_equal_without_reuse_and_reused_counts(rt):
    a, b = random_pixels(20), random_pixels(21)
    want_a = cold(rt, FINDINGS_PROMPT, a)
    assert want_a.timings["prompt_cached_tokens"] == 0 and len(set(want_a.tokens)) >= 4
    want_q = cold(rt, QUESTION, a)
    want_b = cold(rt, FINDINGS_PROMPT, b)
    findings, question = positions(rt, FINDINGS_PROMPT, 0), positions(rt, QUESTION, 0)
    before_image = findings.index(("image", 0, 0))
    n = len(findings)
    # (prompt, image, reference, positions expected to be reused)
    steps = [
        (FINDINGS_PROMPT, b, want_b, before_image),  # another image: only the chat text before it
        (FINDINGS_PROMPT, b, want_b, n - 1),  # repeated: all but the last position
        (FINDINGS_PROMPT, a, want_a, before_image),
        (QUESTION, a, want_q, shared_prefix(findings, question)),  # same image, other question
        (FINDINGS_PROMPT, a, want_a, n - 1),  # the state saved two requests ago is restored
        (QUESTION, a, want_q, len(question) - 1),
    ]
    assert shared_prefix(findings, question) > before_image + rt.config.n_image_tokens
    rt.complete("Warm-up.", random_pixels(22), max_tokens=2)  # another image is in the KV cache
    for prompt, image, want, reused in steps:
        got = rt.complete(prompt, image, max_tokens=TOKENS)
        assert got.tokens == want.tokens and got.text == want.text
        assert got.timings["prompt_cached_tokens"] == reused
        assert got.usage == want.usage


def test_switch_off_and_the_torch_backend_reuse_nothing(rt, runtime_built):
    pixels = random_pixels(23)
    rt.complete(FINDINGS_PROMPT, pixels, max_tokens=2)
    rt.prefix_cache = False
    try:
        again = rt.complete(FINDINGS_PROMPT, pixels, max_tokens=2)
    finally:
        rt.prefix_cache = True
    assert again.timings["prompt_cached_tokens"] == 0
    assert rt.complete(FINDINGS_PROMPT, pixels, max_tokens=2).timings["prompt_cached_tokens"] > 0
    model, _, bundle = runtime_built
    off = Runtime.from_bundle(bundle, threads=1, prefix_cache=False, warmup=False)
    try:
        cached = [
            off.complete(FINDINGS_PROMPT, pixels, max_tokens=2).timings["prompt_cached_tokens"]
            for _ in range(2)
        ]
        assert cached == [0, 0] and off.prefix_cache is False
    finally:
        off.close()
    # The PyTorch backend has no prefix reuse: the same request twice reports none.
    torch_rt = Runtime(rt.bundle, rt.vision, TorchLLMBackend(model.llm, "torch-fp32"), rt.tokenizer)
    runs = [torch_rt.complete(FINDINGS_PROMPT, pixels, max_tokens=4) for _ in range(2)]
    assert [r.timings["prompt_cached_tokens"] for r in runs] == [0, 0]
    assert runs[0].tokens == runs[1].tokens and len(runs[0].tokens) == 4


def test_eval_reusing_keeps_generated_tokens_for_a_follow_up(rt):
    llm = rt.llm.llm
    embeds = rt.image_embeddings(random_pixels(24)).embeds
    ids = rt.prompt_ids(FINDINGS_PROMPT, with_image=True)
    prompt = rt.segments(ids, embeds)
    n = len(ids) - 1 + len(embeds)
    _, reused = llm.eval_reusing(prompt)
    generated = [5, 6, 7]
    for token in generated:
        llm.eval([[token]])
    follow_up = [*prompt, generated + [8, 9]]  # the answer, then more text: a next turn
    logits, reused = llm.eval_reusing(follow_up)
    assert reused == n + len(generated) and llm.n_past == n + len(generated) + 2
    llm.reset()
    assert np.allclose(logits, llm.eval(follow_up), atol=1e-2)
    # A prompt shorter than what the cache holds: the tail is dropped, the last position redone.
    logits, reused = llm.eval_reusing(prompt)
    assert (reused, llm.n_past) == (n - 1, n)
    llm.reset()
    assert np.allclose(logits, llm.eval(prompt), atol=1e-2)


def test_a_failed_decode_forgets_the_sequence(rt, monkeypatch):
    pixels = random_pixels(25)
    want = cold(rt, FINDINGS_PROMPT, pixels)
    llm = rt.llm.llm
    rt.complete(FINDINGS_PROMPT, pixels, max_tokens=TOKENS)  # the whole prompt is in the cache
    decode = llama_cpp.llama_decode
    calls = []

    def fails_on_second(ctx, batch):  # llama.cpp refusing a batch (e.g. no KV slot left)
        calls.append(batch.n_tokens)
        return 1 if len(calls) == 2 else decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", fails_on_second)
    # The question's suffix (the text after the shared prefix) decodes, then a step fails.
    with pytest.raises(LlamaCppError, match="llama_decode failed with status 1"):
        rt.complete(QUESTION, pixels, max_tokens=TOKENS)
    assert len(calls) == 2 and llm.n_past == 0 and llm.position_keys() == []
    monkeypatch.setattr(llama_cpp, "llama_decode", decode)
    llm.states.clear()  # else the saved prompt state would (correctly) be restored
    after = rt.complete(FINDINGS_PROMPT, pixels, max_tokens=TOKENS)
    assert after.timings["prompt_cached_tokens"] == 0 and after.tokens == want.tokens
    # Bad input is refused before anything is decoded: the cached sequence stays usable.
    with pytest.raises(LlamaCppError, match="outside the vocabulary"):
        llm.eval_reusing([[1, 10_000]])
    with pytest.raises(LlamaCppError, match="exceed the context"):
        llm.eval_reusing([[1] * (llm.n_ctx + 1)])
    again = rt.complete(FINDINGS_PROMPT, pixels, max_tokens=TOKENS)
    assert again.timings["prompt_cached_tokens"] == after.usage["prompt_tokens"] - 1
    assert again.tokens == want.tokens


def test_saved_states_serve_alternating_images(rt):
    llm = rt.llm.llm
    images = [random_pixels(26), random_pixels(27)]
    want = [cold(rt, FINDINGS_PROMPT, image) for image in images]
    n = want[0].usage["prompt_tokens"]
    llm.states.clear()
    first = [rt.complete(FINDINGS_PROMPT, image, max_tokens=TOKENS) for image in images]
    second = [rt.complete(FINDINGS_PROMPT, image, max_tokens=TOKENS) for image in images]
    assert [c.tokens for c in first + second] == [w.tokens for w in want * 2]
    assert [c.timings["prompt_cached_tokens"] for c in second] == [n - 1, n - 1]
    assert len(llm.states) == 2 and 0 < llm.states.nbytes <= llm.states.max_bytes
    # Without saved states the other image's KV is gone: only the text before the image is kept.
    states, llm.states = llm.states, None
    try:
        third = [rt.complete(FINDINGS_PROMPT, image, max_tokens=TOKENS) for image in images]
    finally:
        llm.states = states
    assert [c.tokens for c in third] == [w.tokens for w in want]
    before_image = positions(rt, FINDINGS_PROMPT, 0).index(("image", 0, 0))
    assert [c.timings["prompt_cached_tokens"] for c in third] == [before_image] * 2


def test_state_lru_is_bounded():
    def blob(size: int) -> ctypes.Array:
        return (ctypes.c_uint8 * size)()

    states = SequenceStates(max_bytes=250, max_entries=3)
    assert states.put([1, 2], blob(100)) and states.put([1, 3], blob(100))
    assert states.best([1, 2, 9]) == ((1, 2), 2)
    states.get((1, 2))  # now the most recent
    assert states.put([4], blob(100))  # 300 bytes > 250: the least recent, (1, 3), goes
    assert [1, 3] not in states and [1, 2] in states and [4] in states
    assert states.nbytes == 200 and len(states) == 2
    assert not states.put([5], blob(251)) and len(states) == 2  # one entry over the bound
    states.put([1, 2], blob(50))  # replacing an entry counts its new size only
    assert states.nbytes == 150
    few = SequenceStates(max_bytes=10_000, max_entries=2)
    for i in range(5):
        few.put([i], blob(10))
    assert len(few) == 2 and few.nbytes == 20 and [4] in few and [3] in few
    assert few.best([7]) == ((), 0)
    with pytest.raises(ValueError, match=">= 0"):
        SequenceStates(-1)


def test_bench_reports_the_repeated_image_ttft(rt, tmp_path):
    from cxrlite.bench.latency import run_job
    from cxrlite.bench.report import add_ratios, summarize, summarize_job, table_rows
    from cxrlite.imaging.write import png_bytes
    from cxrlite.phantoms.generator import make_phantom_study

    image = tmp_path / "study.png"
    image.write_bytes(png_bytes(make_phantom_study(0, 1, size=256)[1]))
    job = {"bundle": str(rt.bundle.path), "kind": "llm", "spec": "gguf-f32", "vision": "onnx-fp32",
           "image_file": str(image), "runs": 3, "warmup": 1, "max_tokens": 2, "threads": 1,
           "checkpoint": None, "n_ctx": None, "n_gpu_layers": 0}  # fmt: skip
    raw = run_job(job)
    assert raw["ok"], raw
    findings = positions(rt, FINDINGS_PROMPT, 0)
    shared = shared_prefix(findings, positions(rt, QUESTION, 0))
    assert raw["repeat_cached_tokens"] == {"cold": 0, "same": len(findings) - 1, "other": shared}
    for key in ("repeat_cold_ttft_ms", "repeat_same_ttft_ms", "repeat_other_ttft_ms"):
        assert len(raw[key]) == 3 and min(raw[key]) > 0
    row = summarize_job(raw, rt.bundle)
    result = {"vision": {}, "llm": {"gguf-f32": row}, "settings": {"max_tokens": 2},
              "image": {"decode_ms": summarize([1.0]), "preprocess_ms": summarize([1.0])}}  # fmt: skip
    add_ratios(result)
    cold = row["repeat_cold_ttft_ms"]["p50"]
    assert row["repeat_same_speedup"] == pytest.approx(cold / row["repeat_same_ttft_ms"]["p50"])
    (title,) = [t for t in table_rows(result) if t.startswith("Repeated image")]
    (cells,) = table_rows(result)[title][1]
    assert cells[0] == "gguf-f32" and cells[-1] == f"{len(findings) - 1}/{shared}"
    off = run_job({**job, "repeated_image": False, "runs": 1, "warmup": 0})
    assert off["ok"] and not any(key.startswith("repeat_") for key in off)
