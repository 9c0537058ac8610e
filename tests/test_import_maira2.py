"""`cxrlite import maira-2` on random weights written in the published layout, at the real
image geometry (518 px, 1369 image tokens): the vision tower against transformers' own
Dinov2Backbone loading the published names (MAIRA-2's code path), the LLM against transformers'
Llama with the published RoPE scaling, the prompt ids against MAIRA-2's template rendered from
its chat_template.json, the preprocessing against BitImageProcessor after MAIRA-2's per-image
normalization, a whole report, and bad inputs."""

from __future__ import annotations

import json
import shutil

import jinja2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from published_testkit import MAIRA2_MEAN, MAIRA2_STD, write_maira2

from cxrlite.cli import main
from cxrlite.export.importers.maira2 import FINDINGS_PROMPT, import_maira2
from cxrlite.imaging.preprocess import preprocess
from cxrlite.runtime import Runtime
from cxrlite.runtime.onnx_runner import onnx_session


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_maira2(tmp_path_factory.mktemp("maira-2") / "maira-2")


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "bundle"
    return import_maira2(published, out, accept_license=True)


def published_weights(src):
    from safetensors.torch import load_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(src / shard)))
    return state


def smooth_image(height: int = 600, width: int = 500) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return (0.3 + 0.2 * np.sin(x / 40) * np.cos(y / 55)).astype(np.float32)


def test_vision_tower_matches_transformers_dinov2_backbone_on_the_published_names(
    published, imported, tmp_path
):
    from safetensors.torch import save_file
    from transformers import Dinov2Backbone

    config = json.loads((published / "config.json").read_text())
    state = published_weights(published)
    folder = tmp_path / "rad-dino"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config["vision_config"]))
    vision = {
        k.removeprefix("vision_tower."): v
        for k, v in state.items()
        if k.startswith("vision_tower.")
    }
    save_file(vision, str(folder / "model.safetensors"))
    # transformers converts the published (v4) attention names itself when it loads them
    backbone = Dinov2Backbone.from_pretrained(str(folder), local_files_only=True).eval()
    pixels = preprocess(smooth_image(), imported.preprocess)[None]
    with torch.no_grad():  # Maira2ForConditionalGeneration.get_image_features, by hand
        features = backbone(torch.from_numpy(pixels)).feature_maps[-1][:, 1:]
        x = features
        for n in range(4):
            if n:
                x = torch.nn.functional.gelu(x)
            w = state[f"multi_modal_projector.layers.{2 * n}.weight"]
            x = torch.nn.functional.linear(
                x, w, state[f"multi_modal_projector.layers.{2 * n}.bias"]
            )
    session = onnx_session(imported.variant_file("vision", "onnx-fp32"), ["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels})[0]
    assert got.shape == tuple(x.shape) == (1, 1369, 64)
    assert np.abs(got - x.numpy()).max() < 1e-4


def test_preprocessing_matches_maira2s_processor(published, imported):
    from transformers import BitImageProcessor

    spec = json.loads((published / "preprocessor_config.json").read_text())
    spec = {
        k: v
        for k, v in spec.items()
        if k not in ("auto_map", "processor_class", "image_processor_type")
    }
    gray = smooth_image()
    # processing_maira2._normalize_image: min-max to 0..255, truncated to uint8, then RGB
    array = (gray - gray.min()) / (gray.max() - gray.min()) * 255
    image = Image.fromarray(array.astype(np.uint8)).convert("RGB")
    theirs = BitImageProcessor(**spec)(images=image, return_tensors="np")["pixel_values"][0]
    ours = preprocess(gray, imported.preprocess)
    assert imported.preprocess.minmax and imported.preprocess.mean == (MAIRA2_MEAN,) * 3
    # their uint8 truncation (up to a level) and rounding after the resize, over std 0.2583
    assert np.abs(ours - theirs).max() < 2.5 / 255 / MAIRA2_STD
    assert MAIRA2_STD == imported.preprocess.std[0]


def test_llm_matches_transformers_llama_with_the_published_rope_scaling(published, imported):
    from transformers import LlamaConfig, LlamaForCausalLM

    from cxrlite.runtime.llamacpp import LlamaCppLLM

    config = json.loads((published / "config.json").read_text())["text_config"]
    state = published_weights(published)
    llm = {
        k.removeprefix("language_model."): v
        for k, v in state.items()
        if k.startswith("language_model.")
    }
    ids = list(range(3, 300, 6)) + [400, 520]  # positions far enough for the scaling to show

    def logits(rope_scaling):
        cfg = LlamaConfig(**{**config, "rope_scaling": rope_scaling, "model_type": "llama"})
        model = LlamaForCausalLM(cfg).eval()
        model.load_state_dict(llm)
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()

    want = logits(config["rope_scaling"])
    gguf = imported.variant_file("llm", "gguf-f16")
    with LlamaCppLLM(gguf, n_ctx=128, n_threads=1, kv_type="f32", flash_attn=False) as runner:
        got = runner.eval_tokens(ids, all_logits=True)
    assert got.shape == (len(ids), 527)  # 320 pieces + MAIRA-2's 207 added tokens
    error = np.abs(got - want).max()
    assert error < 2e-3  # f16 weights
    assert np.abs(logits(None) - want).max() > 5 * error  # the RoPE scaling is tested


def test_prompt_ids_are_maira2s_own_template_and_tokenizer(published, imported):
    from transformers import AutoTokenizer

    template = json.loads((published / "chat_template.json").read_text())["chat_template"]
    # Maira2Processor.format_reporting_input, frontal image only, no indication/technique/comparison
    content = [
        {"type": "text", "text": "Given the current frontal image only"},
        {"type": "image"},
        {"type": "text", "text": FINDINGS_PROMPT.split("<image>", 1)[1]},
    ]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(
        messages=[{"role": "user", "content": content}],
        add_generation_prompt=True,
        eos_token="</s>",
    )
    assert text.startswith("You are an expert radiology assistant") and text.endswith("ASSISTANT: ")
    tokenizer = AutoTokenizer.from_pretrained(str(published), trust_remote_code=False)
    want = tokenizer(text).input_ids  # the processor's call: BOS added
    runtime = Runtime.from_bundle(imported.path, warmup=False, threads=1)
    assert runtime.prompt_ids(FINDINGS_PROMPT, with_image=True) == want
    assert want[0] == 1 and want.count(imported.config.image_token_id) == 1
    report = runtime.report(smooth_image(), max_tokens=5)
    assert report["impression"] is None and report["finish_reason"]["findings"] == "length"
    assert report["usage"] == {"prompt_tokens": len(want) - 1 + 1369, "completion_tokens": 5}
    runtime.close()


def _break(defect, src):
    config = json.loads((src / "config.json").read_text())
    if defect == "reshaped backbone":
        config["vision_config"]["reshape_hidden_states"] = True
    elif defect == "another feature layer":
        config["vision_feature_layer"] = -2
    elif defect == "wrong image token":
        config["image_token_index"] = 5
    elif defect == "missing shard":
        (src / "model-00002-of-00002.safetensors").unlink()
    elif defect == "stray weight":
        from safetensors.torch import load_file, save_file

        shard = src / "model-00001-of-00002.safetensors"
        state = load_file(str(shard))
        state["multi_modal_projector.layers.8.weight"] = torch.zeros(2)
        save_file(state, str(shard))
    (src / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "defect, message",
    [
        ("reshaped backbone", "reshape_hidden_states is True"),
        ("another feature layer", "vision_feature_layer is -2"),
        ("wrong image token", "is not image_token_index 5"),
        ("missing shard", "no model-00002-of-00002.safetensors"),
        ("stray weight", "unexpected weights ['multi_modal_projector.layers.8.weight']"),
        ("licence not accepted", "pass --accept-license"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(published, tmp_path, defect, message):
    src = shutil.copytree(published, tmp_path / "src")
    _break(defect, src)
    args = ["import", "maira-2", str(src), "--out", str(tmp_path / "out")]
    if defect != "licence not accepted":
        args.append("--accept-license")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoint").exists()
    assert not list(tmp_path.glob(".tmp-*"))
