"""cxrlite.runtime: backend choice, llama.cpp + ONNX greedy parity with PyTorch, the embedding
cache, streaming, stop strings, seeded sampling, report(), typed image errors, GPTQ."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from runtime_testkit import random_pixels

from cxrlite.bundle import Key, Variant
from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, LABEL_VALUES
from cxrlite.data.prompts import FINDINGS_PROMPT
from cxrlite.eval.evaluation import option_logprobs
from cxrlite.eval.labeler import label_report
from cxrlite.imaging.errors import DegenerateImageError, ImageError, NotAnImageError
from cxrlite.imaging.write import png_bytes
from cxrlite.model.tokenizer import encode_example
from cxrlite.phantoms.generator import make_phantom_study
from cxrlite.runtime import (
    BackendError,
    EmbeddingCache,
    Hardware,
    Runtime,
    Sampler,
    SamplingParams,
    TextStream,
    plan_llm,
    plan_vision,
)
from cxrlite.runtime.vision import OnnxVision, TorchVision

STRICT = {"kv_type": "f32", "flash_attn": False}  # llama.cpp's exact f32 path (see gguf_parity)


@pytest.fixture(scope="module")
def rt(runtime_built):
    _, _, bundle = runtime_built
    # One thread: a tiny model gains nothing from more, and llama.cpp's spinning thread barriers
    # stall whenever another process takes one of the cores they spin on.
    runtime = Runtime.from_bundle(bundle, threads=1, **STRICT)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def reference_rt(runtime_built):
    _, _, bundle = runtime_built
    threads = torch.get_num_threads()  # threads=1 sets torch's process-wide count: restored below
    runtime = Runtime.from_bundle(
        bundle, vision_backend="torch", llm_backend="torch", threads=1, warmup=False
    )
    yield runtime
    runtime.close()
    torch.set_num_threads(threads)


class CountingVision:
    """Wraps a real vision backend and counts its calls."""

    def __init__(self, inner):
        self.inner, self.name, self.device, self.calls = inner, inner.name, inner.device, 0

    def encode(self, pixels):
        self.calls += 1
        return self.inner.encode(pixels)


# --- backend choice (pure rules) -------------------------------------------------------------

L4 = {"tensorrt_version": "10.3", "compute_capability": [8, 9], "gpu_name": "L4"}


def _variants(section: str, entries: dict[str, dict]) -> dict[str, Variant]:
    return {name: Variant(section, name, entry) for name, entry in entries.items()}


VISION = _variants(Key.VISION, {
    "onnx-fp32": {"kind": "onnx"},
    "onnx-fp16": {"kind": "onnx"},
    "tensorrt-fp16": {"kind": "tensorrt", "engine": L4},
})  # fmt: skip
LLM = _variants(Key.LLM, {"gguf-q4_k_m": {"kind": "gguf"}, "gptq-4bit": {"kind": "gptq"}})


def test_vision_choice_follows_hardware():
    cpu = Hardware()
    assert plan_vision(VISION, "onnx-fp32", cpu).variant == "onnx-fp32"
    cuda_ort = Hardware(cuda=True, ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert plan_vision(VISION, "onnx-fp32", cuda_ort).variant == "onnx-fp16"
    trt = Hardware(cuda=True, trt_gpu=L4)
    assert plan_vision(VISION, "onnx-fp32", trt).backend == "tensorrt"
    other_gpu = Hardware(
        cuda=True, trt_gpu={**L4, "compute_capability": [9, 0], "gpu_name": "H100"}
    )
    assert plan_vision(VISION, "onnx-fp32", other_gpu).variant == "onnx-fp32"
    with pytest.raises(BackendError, match="compute capability"):
        plan_vision(VISION, "onnx-fp32", other_gpu, backend="tensorrt")
    assert plan_vision(VISION, "onnx-fp32", cpu, backend="torch").name == "torch-fp32"
    with pytest.raises(BackendError, match="no vision variant 'onnx-int8'"):
        plan_vision(VISION, "onnx-fp32", cpu, variant="onnx-int8")


def test_llm_choice_follows_hardware():
    both = Hardware(llama_cpp=True, gptqmodel=True)
    # GPTQ default, no GPU: the GGUF variant runs instead
    assert plan_llm(LLM, "gptq-4bit", both).variant == "gguf-q4_k_m"
    assert (
        plan_llm(LLM, "gptq-4bit", Hardware(cuda=True, llama_cpp=True, gptqmodel=True)).variant
        == "gptq-4bit"
    )
    assert plan_llm(LLM, "gguf-q4_k_m", Hardware(gptqmodel=True)).variant == "gptq-4bit"
    assert plan_llm(LLM, "gguf-q4_k_m", both, backend="gguf").backend == "llama.cpp"
    assert plan_llm(LLM, "gguf-q4_k_m", both, backend="gptq").variant == "gptq-4bit"
    with pytest.raises(BackendError, match="not installed"):
        plan_llm(LLM, "gguf-q4_k_m", Hardware(gptqmodel=True), variant="gguf-q4_k_m")
    with pytest.raises(BackendError, match="no LLM variant of this bundle can run here"):
        plan_llm(LLM, "gguf-q4_k_m", Hardware())


def test_reference_refuses_another_checkpoint(runtime_built, tmp_path):
    _, ckpt, bundle = runtime_built
    other = shutil.copytree(ckpt, tmp_path / "other")
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BackendError, match="not the checkpoint this bundle was exported from"):
        Runtime.from_bundle(bundle, llm_backend="torch", checkpoint=other, warmup=False)


# --- parity with PyTorch ---------------------------------------------------------------------


def torch_greedy(model, tokenizer, pixels, max_new_tokens):
    """CXRVLM.generate (transformers' generate with inputs_embeds): the reference ids."""
    n_image = model.cfg.n_image_tokens
    ids = encode_example(tokenizer, FINDINGS_PROMPT, None, with_image=True, n_image_tokens=n_image)
    pixels = torch.from_numpy(pixels)[None]
    out = model.generate(
        torch.tensor([ids["input_ids"]]), pixels=pixels, max_new_tokens=max_new_tokens
    )
    return out[0].tolist()


def test_greedy_ids_equal_pytorch(runtime_built, rt, reference_rt):
    model, _, _ = runtime_built
    assert rt.variants == {"vision": "onnx-fp32", "llm": "gguf-f32"}
    for seed in (0, 1):
        pixels = random_pixels(seed)
        want = torch_greedy(model, rt.tokenizer, pixels, 32)
        got = rt.complete(FINDINGS_PROMPT, pixels, max_tokens=32)
        assert got.tokens == want
        assert len(want) == 32 and len(set(want)) >= 10  # a varied text, not one repeated token
        assert reference_rt.complete(FINDINGS_PROMPT, pixels, max_tokens=32).tokens == want


def test_onnx_and_torch_vision_agree(runtime_built, rt):
    model, _, bundle = runtime_built
    batch = np.stack([random_pixels(s) for s in range(3)])
    want = TorchVision(model).encode(batch)
    assert want.shape == (3, 16, 64)
    assert np.abs(rt.vision.encode(batch) - want).max() < 1e-4
    fp16 = OnnxVision(rt.bundle.variant_file("vision", "onnx-fp16"), "onnx-fp16")
    assert np.abs(fp16.encode(batch) - want).max() / np.abs(want).max() < 1e-2


def test_option_scores_and_perplexity_match_pytorch(runtime_built, rt, reference_rt):
    model, _, _ = runtime_built
    from cxrlite.data.records import TaskRecord

    record = TaskRecord("r", "binary_disease_classification", ["x"], "Does this chest X-ray show edema?",
                        "yes", "test", "phantom", ["yes", "no"])  # fmt: skip
    pixels = random_pixels(3)
    want = option_logprobs(model, rt.tokenizer, record, lambda _: torch.from_numpy(pixels))
    for runtime in (rt, reference_rt):
        got = runtime.option_logprobs(record.prompt, record.options, pixels)
        assert np.allclose(got, want, atol=1e-3)
    text = "heart size normal. no pleural effusion."
    ppl = rt.perplexity([text])
    assert np.isclose(ppl["perplexity"], reference_rt.perplexity([text])["perplexity"], rtol=1e-4)
    assert np.isclose(ppl["perplexity"], np.exp(-rt.text_logprobs(text).mean()))
    assert ppl["perplexity"] > 1.0 and ppl["n_tokens"] == len(rt.text_logprobs(text))


# --- cache, streaming, stops, sampling -------------------------------------------------------


def test_cache_skips_the_vision_tower(rt):
    counting = CountingVision(rt.vision)
    rt.vision = counting
    try:
        pixels = random_pixels(10)
        first = rt.image_embeddings(pixels)
        second = rt.image_embeddings(pixels.copy())  # same content, another array
        assert (first.cache_hit, second.cache_hit, counting.calls) == (False, True, 1)
        assert np.array_equal(first.embeds, second.embeds) and not second.embeds.flags.writeable
        assert second.vision_ms == 0.0 and first.vision_ms > 0.0
        completion = rt.complete(FINDINGS_PROMPT, pixels, max_tokens=2)
        assert completion.cache_hit is True and counting.calls == 1
        rt.image_embeddings(random_pixels(11))
        assert counting.calls == 2
    finally:
        rt.vision = counting.inner


def test_same_file_bytes_skip_decoding(rt):
    import io

    from PIL import Image as PILImage

    gray = (np.random.default_rng(7).random((96, 96)) * 255).astype(np.uint8)

    def png(level: int) -> bytes:
        out = io.BytesIO()
        PILImage.fromarray(gray).save(out, format="PNG", compress_level=level)
        return out.getvalue()

    fast, slow = png(9), png(1)  # the same pixels in two different files
    assert fast != slow and rt.lookup_file(rt.file_key(fast)) is None
    first = rt.image_embeddings(fast)
    assert first.cache_hit is False and rt.cache.stats()["aliases"] >= 1
    again = rt.lookup_file(rt.file_key(fast))  # no decode: found by the file's bytes
    assert again is not None and again.cache_hit and np.array_equal(again.embeds, first.embeds)
    assert rt.image_embeddings(fast).cache_hit is True
    # another file with the same pixels: decoded, then found by its pixels
    assert rt.lookup_file(rt.file_key(slow)) is None
    other = rt.image_embeddings(slow)
    assert other.cache_hit is True and np.array_equal(other.embeds, first.embeds)
    assert rt.lookup_file(rt.file_key(slow)) is not None  # and remembered under its own bytes now
    # an encoded image passed back in is used as is (no lookup at all)
    hits = rt.cache.stats()["hits"]
    assert rt.image_embeddings(first) is first and rt.cache.stats()["hits"] == hits
    rt.cache.clear()
    assert rt.lookup_file(rt.file_key(fast)) is None and rt.cache.stats()["aliases"] == 0


def test_cache_is_bounded_lru():
    cache = EmbeddingCache(max_entries=2, max_bytes=1 << 20)
    a, b, c = (np.full((4, 8), v, np.float32) for v in (1, 2, 3))
    cache.put("a", a), cache.put("b", b)
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", c)
    assert "b" not in cache and "a" in cache and "c" in cache
    small = EmbeddingCache(max_entries=10, max_bytes=a.nbytes * 2)
    for key in "abc":
        small.put(key, a)
    assert len(small) == 2 and small.stats()["bytes"] == 2 * a.nbytes
    disabled = EmbeddingCache(max_entries=0)
    assert disabled.put("a", a) is not None  # the caller still gets its embeddings back...
    assert len(disabled) == 0 and "a" not in disabled and disabled.get("a") is None  # ...unkept


def test_streaming_yields_tokens_as_they_come_and_stops_early(rt):
    pixels = random_pixels(0)
    full = rt.complete(FINDINGS_PROMPT, pixels, max_tokens=32)
    generation = rt.generate(FINDINGS_PROMPT, pixels, max_tokens=32)
    events = []
    for event in generation:
        events.append(event)
        assert generation.result is None  # still running: tokens arrive before the end
        if len(events) == 3:
            break
        with pytest.raises(RuntimeError, match="previous generation is unfinished"):
            rt.complete(FINDINGS_PROMPT, pixels, max_tokens=2)  # same thread: no deadlock
    generation.close()
    assert [e.token_id for e in events] == full.tokens[:3]
    assert (
        generation.result.finish_reason == "cancelled"
        and generation.result.tokens == full.tokens[:3]
    )
    # the LLM lock was released: another generation runs
    assert rt.complete(FINDINGS_PROMPT, pixels, max_tokens=4).tokens == full.tokens[:4]

    with rt.generate(FINDINGS_PROMPT, pixels, max_tokens=32) as generation:
        seen = []
        for event in generation:
            seen.append(event)
            if len(seen) == 5:  # a server's other thread cancels (client gone)
                canceller = threading.Thread(target=generation.cancel)
                canceller.start()
                canceller.join()
    assert seen[-1].token_id is None and seen[-1].finish_reason == "cancelled"
    assert generation.result.tokens == full.tokens[:5]

    events = list(rt.generate(FINDINGS_PROMPT, pixels, max_tokens=32))
    final = events[-1]
    assert (final.token_id, final.finish_reason, final.index) == (None, "length", 32)
    assert "".join(e.text for e in events) == full.text


def test_stop_strings_end_the_text_before_them(rt):
    pixels = random_pixels(0)
    full = rt.complete(FINDINGS_PROMPT, pixels, max_tokens=32)
    assert len(full.text) > 12
    stop = full.text[8:11]
    cut = full.text[: full.text.index(stop)]
    events = list(rt.generate(FINDINGS_PROMPT, pixels, max_tokens=32, stop=[stop, "never-seen"]))
    result = "".join(e.text for e in events)
    assert result == cut and events[-1].finish_reason == "stop"
    assert len([e for e in events if e.token_id is not None]) < 32


def test_text_stream_holds_back_stop_prefixes(rt):
    ids = rt.tokenizer.encode("heart size normal", add_special_tokens=False)
    stream = TextStream(rt.tokenizer, stop=["size n"])
    pieces = [stream.push(t) for t in ids]
    assert "".join(p for p, _ in pieces) == "heart "
    assert pieces[-1][1] is True and "size" not in "".join(p for p, _ in pieces)


def test_seeded_sampling_is_reproducible(rt):
    pixels = random_pixels(0)
    kwargs = dict(max_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    a = rt.complete(FINDINGS_PROMPT, pixels, **kwargs).tokens
    assert rt.complete(FINDINGS_PROMPT, pixels, **kwargs).tokens == a
    assert rt.complete(FINDINGS_PROMPT, pixels, **{**kwargs, "seed": 8}).tokens != a
    greedy = rt.complete(FINDINGS_PROMPT, pixels, max_tokens=16).tokens
    assert (
        rt.complete(FINDINGS_PROMPT, pixels, max_tokens=16, temperature=1.0, top_k=1, seed=3).tokens
        == greedy
    )
    logits = np.array([0.0, 5.0, 4.9, -1.0])
    assert Sampler(SamplingParams(temperature=1.0, top_p=0.1, seed=0))(logits)[0] == 1
    draws = {
        Sampler(SamplingParams(temperature=1.0, top_k=2, seed=s))(logits)[0] for s in range(40)
    }
    assert draws == {1, 2}  # top-k 2 keeps exactly the two best


# --- report, images --------------------------------------------------------------------------


def test_report_gives_findings_impression_labels_and_timings(rt, tmp_path):
    _, image = make_phantom_study(5, 0, size=96)
    path = tmp_path / "study.png"
    path.write_bytes(png_bytes(image))
    result = rt.report(path, max_tokens=24)
    assert set(result) == {
        "findings",
        "impression",
        "labels",
        "variants",
        "cache_hit",
        "finish_reason",
        "timings",
        "usage",
    }
    assert set(result["finish_reason"].values()) <= {"stop", "length"}
    # the impression summarizes the findings just written (text only), as stage 3 trained it to
    from cxrlite.data.prompts import summary_prompt

    summary = rt.complete(summary_prompt(result["findings"]), max_tokens=24)
    assert result["impression"] == summary.text.strip()
    assert result["variants"] == {"vision": "onnx-fp32", "llm": "gguf-f32"}
    assert list(result["labels"]) == list(CHEXPERT_OBSERVATIONS)
    assert set(result["labels"].values()) <= set(LABEL_VALUES)
    text = f"FINDINGS: {result['findings']}\nIMPRESSION: {result['impression']}"
    assert result["labels"] == label_report(text)
    timings = result["timings"]
    assert timings["findings"]["prefill_ms"] > 0 and timings["impression"]["decode_ms"] > 0
    assert (
        timings["total_ms"] >= timings["findings"]["total_ms"] + timings["impression"]["total_ms"]
    )
    assert result["usage"]["completion_tokens"] <= 48
    again = rt.report(path.read_bytes(), max_tokens=24)  # same image as bytes: cached embeddings
    assert again["cache_hit"] is True and again["findings"] == result["findings"]


def test_bad_images_raise_typed_errors(rt, tmp_path):
    with pytest.raises(NotAnImageError) as info:
        rt.complete("Describe.", b"this is not an image at all")
    assert info.value.code == "not_an_image"
    with pytest.raises(ImageError, match="cannot read the file"):
        rt.complete("Describe.", tmp_path / "missing.png")
    flat = png_bytes(np.full((64, 64), 128, np.uint8))
    with pytest.raises(DegenerateImageError):
        rt.report(flat)
    with pytest.raises(ImageError, match=r"expected finite float32 \[1, 64, 64\]"):
        rt.complete("Describe.", np.zeros((3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="image tokens"):
        rt.complete("Compare <image> with <image>.", random_pixels(0))
    # one image token in the text places the image there (MAIRA-2's prompts do)
    placed = rt.prompt_ids("Compare <image> with this one.", with_image=True)
    assert placed.count(rt.image_token_id) == 1
    assert placed.index(rt.image_token_id) > rt.prompt_ids("Compare.", True).index(
        rt.image_token_id
    )


# --- GPTQ --------------------------------------------------------------------------------------


def test_gptq_backend_generates_and_scores(runtime_built, tmp_path, monkeypatch):
    from cxrlite.export.bundle import update_bundle
    from cxrlite.quantize.gptq import quantize_gptq

    _, ckpt, bundle = runtime_built
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    # GPTQModel's C++ packer is compiled on first use; its Python packer needs no build.
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
    texts = ["heart size normal no pleural effusion lung clear no pneumothorax " * 3] * 8

    def add(staging):
        quantize_gptq(ckpt, staging / "llm" / "gptq-4bit", texts, bits=4, group_size=32)
        return {"llm": {"gptq-4bit": {"file": "llm/gptq-4bit", "kind": "gptq", "bits": 4}}}

    update_bundle(copy, add)
    runtime = Runtime.from_bundle(copy, llm_variant="gptq-4bit", threads=1, warmup=False)
    assert runtime.variants == {"vision": "onnx-fp32", "llm": "gptq-4bit"}
    result = runtime.complete(FINDINGS_PROMPT, random_pixels(0), max_tokens=8)
    assert len(result.tokens) == 8 and all(0 <= t < runtime.llm.n_vocab for t in result.tokens)
    scores = runtime.option_logprobs("Is there edema?", ["yes", "no"], random_pixels(0))
    assert all(np.isfinite(scores)) and all(s < 0 for s in scores)
    # cxrlite bench opens the same backend on the device it resolved
    from cxrlite.bench.backends import open_llm_spec
    from cxrlite.bundle import load_bundle

    bench_llm = open_llm_spec(
        load_bundle(copy), "gptq-4bit", n_ctx=128, threads=1, n_gpu_layers=0, checkpoint=None,
        device=torch.device("cpu"),
    )  # fmt: skip
    assert bench_llm.name == "gptq-4bit" and bench_llm.device == "cpu"
