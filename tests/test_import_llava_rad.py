"""`cxrlite import llava-rad` on random weights written in the published layout, at the real
image geometry (518 px, 1369 image tokens): the vision tower against a hand-written timm
forward of the published weights, the LLM against Vicuna with the LoRA merged by peft, the
prompt ids against LLaVA-Rad's chunked tokenization done with SentencePiece itself, a whole
report, and bad inputs."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from published_testkit import VICUNA_SYSTEM, timm_reference, write_llava_rad, write_vicuna

from cxrlite.bundle import load_bundle, sha256_file
from cxrlite.cli import main
from cxrlite.data.labels import CHEXPERT_OBSERVATIONS
from cxrlite.export.importers.llava_rad import FINDINGS_PROMPT, import_llava_rad
from cxrlite.imaging.preprocess import preprocess
from cxrlite.runtime import Runtime
from cxrlite.runtime.onnx_runner import onnx_session


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava-rad")
    base = write_vicuna(root / "vicuna-7b-v1.5")
    return write_llava_rad(root / "llava-rad", vocab=320), base


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory):
    src, base = published
    out = tmp_path_factory.mktemp("imported") / "bundle"
    return import_llava_rad(src, base, out, accept_license=True, revision="test-rev")


def smooth_image(height: int = 600, width: int = 500) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return (0.5 + 0.3 * np.sin(x / 40) * np.cos(y / 55)).astype(np.float32)


def test_vision_tower_matches_a_timm_forward_of_the_published_weights(published, imported):
    src, _ = published
    trunk = torch.load(src / "biomedclipcxr_518_checkpoint.pt", weights_only=True)["state_dict"]
    trunk = {k.removeprefix("module.visual.trunk."): v for k, v in trunk.items() if "trunk" in k}
    projector = torch.load(src / "non_lora_trainables.bin", weights_only=True)
    pixels = preprocess(smooth_image(), imported.preprocess)[None]
    with torch.no_grad():
        want = timm_reference(trunk, projector, torch.from_numpy(pixels)).numpy()
        wrong_layer = timm_reference(trunk, projector, torch.from_numpy(pixels), select=-1)
    session = onnx_session(imported.variant_file("vision", "onnx-fp32"), ["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels})[0]
    assert got.shape == want.shape == (1, 1369, 64)
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(wrong_layer.numpy() - want).max() > 1e-2  # the layer choice is tested


def test_preprocessing_is_open_clips(imported):
    pre = imported.preprocess
    assert (pre.image_size, pre.channels, pre.resize, pre.interpolation) == (
        518,
        3,
        "crop",
        "bicubic",
    )
    assert pre.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_llm_matches_vicuna_with_the_lora_merged_by_peft(published, imported):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from cxrlite.runtime.llamacpp import LlamaCppLLM

    src, base = published
    reference = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    merged = PeftModel.from_pretrained(reference, str(src)).merge_and_unload().eval()
    ids = [1, 5, 17, 33, 60, 100, 200, 319]
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0].numpy()
    gguf = imported.variant_file("llm", "gguf-f16")
    with LlamaCppLLM(gguf, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as llm:
        got = llm.eval_tokens(ids, all_logits=True)
    # f16 weights against fp32; a wrong LoRA scale or a missing merge is off by far more
    assert np.abs(got - want).max() < 3e-3
    plain = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    with torch.no_grad():
        unmerged = plain(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(unmerged - want).max() > 3e-2


def test_prompt_ids_are_llava_rads_chunked_tokenization(published, imported):
    import sentencepiece as spm

    _, base = published
    sp = spm.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    runtime = Runtime.from_bundle(imported.path, warmup=False, threads=1)
    # llava/conversation.py conv_vicuna_v1 + llava/mm_utils.py tokenizer_image_token
    before, after = f"{VICUNA_SYSTEM} USER: ", f"\n{FINDINGS_PROMPT} ASSISTANT:"
    want = [1, *sp.encode(before), 320, *sp.encode(after)]
    assert runtime.prompt_ids(FINDINGS_PROMPT, with_image=True) == want
    report = runtime.report(smooth_image(), max_tokens=6)
    assert report["impression"] is None and report["notes"]
    assert report["finish_reason"] == {"findings": "length", "impression": None}
    assert report["usage"] == {"prompt_tokens": len(want) - 1 + 1369, "completion_tokens": 6}
    assert set(report["labels"]) == set(CHEXPERT_OBSERVATIONS)
    assert report["variants"] == {
        "vision": "onnx-fp32",
        "llm": "gguf-f16",
    }
    runtime.close()


def test_manifest_records_the_model_licence_and_every_source_file(published, imported):
    src, base = published
    record = imported.provenance
    assert record["model"] == "LLaVA-Rad" and record["revision"] == "test-rev"
    assert "research use only" in record["restriction"]
    hashes = record["sources"]["model"]["sha256"]
    assert set(hashes) == {p.name for p in src.iterdir()}
    assert hashes["adapter_model.bin"] == sha256_file(src / "adapter_model.bin")
    assert set(record["sources"]["base"]["sha256"]) == {p.name for p in base.iterdir()}
    assert load_bundle(imported.path).config.report_prompts["impression"] is None


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def _break(defect, src, base):
    if defect == "missing adapter config":
        (src / "adapter_config.json").unlink()
    elif defect == "extra projector key":
        state = torch.load(src / "non_lora_trainables.bin", weights_only=True)
        state["base_model.model.model.mm_projector.4.weight"] = torch.zeros(1)
        torch.save(state, src / "non_lora_trainables.bin")
    elif defect == "unknown timm model":
        text = (src / "biomedclipcxr_518.json").read_text()
        (src / "biomedclipcxr_518.json").write_text(
            text.replace("patch14_dinov2.lvd142m", "patch16_224")
        )
    elif defect == "pickle that runs code":
        (src / "non_lora_trainables.bin").write_bytes(pickle.dumps(Evil()))
    elif defect == "base of another size":
        text = (base / "config.json").read_text()
        (base / "config.json").write_text(text.replace('"hidden_size": 64', '"hidden_size": 96'))


@pytest.mark.parametrize(
    "defect, message",
    [
        ("missing adapter config", "no adapter_config.json"),
        ("extra projector key", "non_lora_trainables.bin: expected exactly"),
        ("unknown timm model", "is not a DINOv2 ViT/14"),
        ("pickle that runs code", "holds something other than tensors"),
        ("base of another size", "hidden_size 96 does not match"),
        ("licence not accepted", "pass --accept-license"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    published, tmp_path, monkeypatch, defect, message
):
    monkeypatch.chdir(tmp_path)
    src = shutil.copytree(published[0], tmp_path / "src")
    base = shutil.copytree(published[1], tmp_path / "base")
    _break(defect, src, base)
    args = ["import", "llava-rad", str(src), "--base", str(base), "--out", str(tmp_path / "out")]
    if defect != "licence not accepted":
        args.append("--accept-license")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)  # click's exit, not an escaped error
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoint").exists()
    assert not list(tmp_path.glob(".tmp-*")) and not (tmp_path / "pwned-by-pickle").exists()


def test_quantize_report_and_eval_work_on_the_imported_bundle(imported, tmp_path):
    """The rest of the pipeline takes the bundle as it is: quantize (its gate asks the model's
    own findings prompt of the PyTorch reference and the variant), then report with the new
    variant."""
    bundle = shutil.copytree(imported.path, tmp_path / "bundle")
    shutil.copytree(imported.source["path"], tmp_path / "bundle-checkpoint")
    runner = CliRunner()
    args = ["quantize", str(bundle), "--gguf", "q8_0", "--eval-studies", "2", "--threads", "1",
            "--checkpoint", str(tmp_path / "bundle-checkpoint")]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "gguf-q8_0" in load_bundle(bundle).llm_variants
    from PIL import Image

    Image.fromarray((smooth_image() * 255).astype(np.uint8)).save(tmp_path / "x.png")
    args = ["report", str(tmp_path / "x.png"), "--bundle", str(bundle), "--llm-variant", "gguf-q8_0",
            "--max-tokens", "4"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "IMPRESSION: (none: this model writes findings only" in result.output


def test_the_server_names_the_model_and_its_licence(imported):
    from fastapi.testclient import TestClient

    from cxrlite.server import ServerSettings, create_app

    runtime = Runtime.from_bundle(imported.path, warmup=False, threads=1)
    with TestClient(create_app(runtime, ServerSettings(max_tokens_cap=4))) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["published_model"]["model"] == "LLaVA-Rad"
        assert "research use only" in card["published_model"]["restriction"]
        assert 'id="license"' in client.get("/").text
