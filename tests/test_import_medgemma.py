"""`cxrlite import medgemma` on random weights written in MedGemma 4B-it's published layout, at
tiny widths: the vision tower and projector against transformers' own Gemma3ForConditionalGeneration
loading the published folder, the prompt ids against Gemma3Processor (its chat template and image
expansion), the Gemma 3 LLM through llama.cpp against transformers with an image span (fed
causally it must differ: the bidirectional image attention is tested), a report, bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from medgemma_testkit import TOKENS_PER_IMAGE, VISION, write_medgemma
from PIL import Image

from cxrlite.cli import main
from cxrlite.export.importers.medgemma import FINDINGS_PROMPT, SYSTEM_PROMPT, import_medgemma
from cxrlite.imaging.preprocess import preprocess
from cxrlite.model.checkpoint import load as load_checkpoint
from cxrlite.runtime import Runtime
from cxrlite.runtime.llamacpp import LlamaCppLLM
from cxrlite.runtime.llm import TorchLLMBackend
from cxrlite.runtime.onnx_runner import onnx_session


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_medgemma(tmp_path_factory.mktemp("medgemma") / "medgemma-4b-it")


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "bundle"
    return import_medgemma(published, out, accept_license=True)


@pytest.fixture(scope="module")
def reference(published):
    """What a MedGemma user runs: transformers' Gemma3 model and processor on the folder."""
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(
        str(published), local_files_only=True, dtype=torch.float32
    ).eval()
    return model, AutoProcessor.from_pretrained(str(published), local_files_only=True)


def gray_levels(size: int = VISION["image"]) -> np.ndarray:
    """An image at the model's size on exact 8-bit levels: the processor's uint8 input and our
    float input are then the same picture (no resize, no rounding)."""
    y, x = np.mgrid[0:size, 0:size]
    return (np.round((0.45 + 0.3 * np.sin(x / 7) * np.cos(y / 5)) * 255) / 255).astype(np.float32)


def messages():
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "text", "text": "Describe this X-ray"},
                                     {"type": "image"}]},
    ]  # fmt: skip


def processor_inputs(reference, gray):
    _, processor = reference
    text = processor.apply_chat_template(messages(), add_generation_prompt=True, tokenize=False)
    image = Image.fromarray((gray * 255).round().astype(np.uint8)).convert("RGB")
    # as processor.apply_chat_template(tokenize=True) calls it: the template wrote the <bos>
    return processor(text=text, images=image, add_special_tokens=False, return_tensors="pt")


def test_vision_tower_matches_transformers_gemma3(reference, imported):
    model, _ = reference
    gray = gray_levels()
    inputs = processor_inputs(reference, gray)
    ours = preprocess(gray, imported.preprocess)[None]
    assert np.abs(ours - inputs["pixel_values"].numpy()).max() < 1e-6  # the same pixels
    with torch.no_grad():
        want = model.get_image_features(pixel_values=inputs["pixel_values"])
    want = getattr(want, "pooler_output", want).numpy().reshape(1, TOKENS_PER_IMAGE, -1)
    session = onnx_session(imported.variant_file("vision", "onnx-fp32"), ["CPUExecutionProvider"])
    got = session.run(None, {"pixels": ours})[0]
    assert got.shape == want.shape == (1, TOKENS_PER_IMAGE, 64)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, float(np.abs(want).max()))


def test_prompt_ids_are_gemma3_processors(reference, imported):
    want = processor_inputs(reference, gray_levels())["input_ids"][0].tolist()
    runtime = Runtime.from_bundle(imported.path, warmup=False, threads=1)
    try:
        image_id = imported.config.image_token_id
        ids = runtime.prompt_ids(FINDINGS_PROMPT, with_image=True)
        expanded = [t for i in ids for t in ([i] * TOKENS_PER_IMAGE if i == image_id else [i])]
        assert expanded == want and want.count(image_id) == TOKENS_PER_IMAGE
        report = runtime.report(gray_levels(), max_tokens=4)
        assert report["impression"] is None and report["finish_reason"]["findings"] == "length"
        assert report["usage"] == {"prompt_tokens": len(want), "completion_tokens": 4}
    finally:
        runtime.close()


def test_llm_with_an_image_matches_transformers_and_needs_bidirectional_attention(
    reference, imported, monkeypatch
):
    """llama.cpp (the bundle's f16 GGUF, image rows through batch.embd) against transformers'
    Gemma3ForConditionalGeneration on the processor's ids and pixels, at every position."""
    model, _ = reference
    inputs = processor_inputs(reference, gray_levels())
    ids = inputs["input_ids"][0].tolist()
    with torch.no_grad():
        want = model(**inputs).logits[0].numpy()
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
    image = getattr(image, "pooler_output", image).reshape(TOKENS_PER_IMAGE, -1).numpy()
    image_id = imported.config.image_token_id
    start = ids.index(image_id)
    segments = [ids[:start], image, ids[start + TOKENS_PER_IMAGE :]]
    gguf = imported.variant_file("llm", "gguf-f16")

    def llama_cpp_logits():
        with LlamaCppLLM(gguf, n_ctx=128, n_threads=1, kv_type="f32", flash_attn=False) as runner:
            assert runner.arch == "gemma3"
            return runner.eval(segments, all_logits=True)

    error = float(np.abs(llama_cpp_logits() - want).max())
    assert error < 5e-3  # f16 weights, ggml's f16 GELU table
    # the PyTorch backend (the quality gate's reference) from the imported checkpoint
    model_ours, _, _ = load_checkpoint(imported.path.with_name("bundle-checkpoint"))
    torch_llm = TorchLLMBackend(model_ours.llm, "torch-fp32", n_ctx=128)
    assert np.abs(torch_llm.prefill(segments) - want[-1]).max() < 1e-4
    assert (
        np.abs(torch_llm.score(segments[:2], segments[2]) - _logprobs(want, ids, start)).max()
        < 1e-4
    )
    monkeypatch.setattr(LlamaCppLLM, "bidirectional_image", False, raising=False)
    monkeypatch.setattr(LlamaCppLLM, "__init__", _causal_init(LlamaCppLLM.__init__), raising=True)
    causal = float(np.abs(llama_cpp_logits() - want).max())
    assert causal > 20 * error, (causal, error)
    parity = imported.variant("llm", "gguf-f16").parity
    assert parity["max_abs_diff_image"] < 5e-3 and parity["max_abs_diff_tokens"] < 5e-3


def _logprobs(logits, ids, start):
    """Log-probabilities of the ids after the image under the reference's logits."""
    tail = start + TOKENS_PER_IMAGE
    rows = torch.log_softmax(torch.from_numpy(logits[tail - 1 : len(ids) - 1]), -1)
    return rows[torch.arange(len(rows)), torch.tensor(ids[tail:])].numpy()


def _causal_init(init):
    def causal(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.bidirectional_image = False  # the image fed as ordinary causal positions

    return causal


def _break(defect, src):
    config = json.loads((src / "config.json").read_text())
    if defect == "softcapping":
        config["text_config"]["final_logit_softcapping"] = 30.0
    elif defect == "other layer pattern":
        config["text_config"]["sliding_window_pattern"] = 4
    elif defect == "wrong image token":
        config["image_token_index"] = 7
    elif defect == "missing tokenizer model":
        (src / "tokenizer.model").unlink()
    elif defect == "wrong shape":
        from safetensors.torch import load_file, save_file

        key = "multi_modal_projector.mm_soft_emb_norm.weight"
        index = json.loads((src / "model.safetensors.index.json").read_text())
        shard = src / index["weight_map"][key]
        state = load_file(str(shard))
        state[key] = torch.zeros(3)
        save_file(state, str(shard))
    (src / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "defect, message",
    [
        ("softcapping", "final_logit_softcapping is 30.0"),
        ("other layer pattern", "text_config.layer_types is"),
        ("wrong image token", "image_token_index 7 is not the tokenizer's <image_soft_token>"),
        ("missing tokenizer model", "no tokenizer.model"),
        ("wrong shape", "mm_soft_emb_norm.weight is (3,), expected (32,)"),
        ("licence not accepted", "Health AI Developer Foundations"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(published, tmp_path, defect, message):
    src = shutil.copytree(published, tmp_path / "src")
    _break(defect, src)
    args = ["import", "medgemma", str(src), "--out", str(tmp_path / "out")]
    if defect != "licence not accepted":
        args.append("--accept-license")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")  # the licence warns first
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoint").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_an_image_is_decoded_whole_never_resumed_part_way(imported):
    from cxrlite.runtime.llamacpp import LlamaCppError
    from cxrlite.runtime.positions import Piece, image_boundary

    pieces = [Piece([1, 2], None, [1, 2]), Piece(None, np.zeros((4, 2)), list("abcd"))]
    assert [image_boundary(pieces, n) for n in range(7)] == [0, 1, 2, 2, 2, 2, 6]
    gguf = imported.variant_file("llm", "gguf-f16")
    with LlamaCppLLM(gguf, n_ctx=64, n_batch=8, n_threads=1) as runner:
        image = np.zeros((TOKENS_PER_IMAGE, runner.n_embd), np.float32)
        with pytest.raises(LlamaCppError, match="must be decoded in one batch"):
            runner.eval([[2], image])
        assert runner.n_past == 0  # refused before anything was decoded


def test_greedy_generation_matches_transformers(reference, imported):
    """CXRVLM.generate (its own loop: transformers' generate cannot take Gemma 3's image masks)
    writes what Gemma3ForConditionalGeneration.generate writes, greedy."""
    model, _ = reference
    inputs = processor_inputs(reference, gray_levels())
    ours, _, _ = load_checkpoint(imported.path.with_name("bundle-checkpoint"))
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, -6:].tolist()
    got = ours.generate(inputs["input_ids"], pixels=inputs["pixel_values"], max_new_tokens=6)
    assert got[0].tolist() == want
