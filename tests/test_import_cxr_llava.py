"""`cxrlite import cxr-llava` on random weights written in the published layout, at the real
image geometry (1 channel, 512 px, patch 16: 1024 image tokens): the vision tower against a
hand-written open_clip forward of the published weights, the LLM against transformers' LlamaModel
and the separate lm_head (CXRLLAVAModel.forward), the preprocessing against the
CLIPImageProcessor CXR-LLaVA builds, the prompt ids against its own conversation and
tokenization re-implemented from its code, a report through the CLI on a 12-bit DICOM, and bad
inputs."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from published_testkit import (
    CXR_LLAVA_MEAN,
    CXR_LLAVA_STD,
    CXR_LLAVA_VISION,
    LLM,
    write_cxr_llava,
)

from cxrlite.bundle import load_bundle, sha256_file
from cxrlite.cli import main
from cxrlite.export.importers import cxr_llava
from cxrlite.export.importers.common import read_json
from cxrlite.export.importers.cxr_llava import FINDINGS_PROMPT, SYSTEM_PROMPT
from cxrlite.imaging.preprocess import preprocess
from cxrlite.runtime import Runtime
from cxrlite.runtime.onnx_runner import onnx_session

SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2}
IMAGE_TOKEN_INDEX = -200  # CXR_LLAVA_HF.py


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_cxr_llava(tmp_path_factory.mktemp("cxr-llava") / "CXR-LLAVA-v2")


@pytest.fixture(scope="module")
def imported(published, tmp_path_factory):
    out = tmp_path_factory.mktemp("imported") / "bundle"
    args = ["import", "cxr-llava", str(published), "--out", str(out), "--accept-license",
            "--revision", "test-rev"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "CXR-LLaVA; CC BY-NC 4.0" in result.output
    return load_bundle(out)  # every file's sha256 checked


def published_weights(src):
    from safetensors.torch import load_file

    index = json.loads((src / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        state.update(load_file(str(src / shard)))
    return {k: v.float() for k, v in state.items()}


def blocks_image(rng_seed: int = 0) -> np.ndarray:
    """Sharp-edged 8-bit blocks, 600 x 700: the resampling filter shows at every edge."""
    rng = np.random.default_rng(rng_seed)
    return (np.kron(rng.integers(0, 2, (60, 70)), np.ones((10, 10))) * 160 + 40).astype(np.uint8)


def open_clip_forward(state, pixels, heads, ln_post=True):
    """CXRLLAVAModel.encode_images by hand from the published weights (VisualTransformer.py's
    blocks): conv1, CLS and positions, ln_pre, resblocks (nn.MultiheadAttention: the fused
    in_proj split q, k, v here), ln_post on every token, CLS dropped, mm_projector."""
    w = {k.removeprefix("vision_tower."): v for k, v in state.items()}
    d = w["class_embedding"].shape[0]

    def norm(x, name):
        return F.layer_norm(x, (d,), w[f"{name}.weight"], w[f"{name}.bias"], eps=1e-5)

    x = F.conv2d(pixels, w["conv1.weight"], stride=w["conv1.weight"].shape[-1])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w["class_embedding"].expand(len(x), 1, d), x], 1) + w["positional_embedding"]
    x = norm(x, "ln_pre")
    for i in range(CXR_LLAVA_VISION["layers"]):
        b = f"transformer.resblocks.{i}."
        y = norm(x, b + "ln_1")
        q, k, v = F.linear(y, w[b + "attn.in_proj_weight"], w[b + "attn.in_proj_bias"]).chunk(3, -1)
        split = lambda t: t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # noqa: E731
        attention = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5, -1)
        y = (attention @ split(v)).transpose(1, 2).flatten(2)
        x = x + F.linear(y, w[b + "attn.out_proj.weight"], w[b + "attn.out_proj.bias"])
        y = F.gelu(F.linear(norm(x, b + "ln_2"), w[b + "mlp.c_fc.weight"], w[b + "mlp.c_fc.bias"]))
        x = x + F.linear(y, w[b + "mlp.c_proj.weight"], w[b + "mlp.c_proj.bias"])
    if ln_post:
        x = norm(x, "ln_post")
    return F.linear(x[:, 1:], state["mm_projector.weight"], state["mm_projector.bias"])


def test_import_writes_a_verified_bundle_with_its_licence_and_parity(published, imported):
    cfg = imported.config
    assert (cfg.vision.kind, cfg.vision.num_channels, cfg.vision.image_size) == ("clip", 1, 512)
    assert cfg.n_image_tokens == 1024 and cfg.vision.num_heads == 2  # width 64 / head_width 32
    assert cfg.bridger.mlp_layers == 1 and not cfg.llm.tie_word_embeddings
    assert cfg.report_prompts == {"findings": FINDINGS_PROMPT, "impression": None}
    record = imported.provenance
    assert record["model"] == "CXR-LLaVA" and record["revision"] == "test-rev"
    assert "research use only" in record["restriction"] and "CC BY-NC 4.0" in record["license"]
    hashes = record["sources"]["model"]["sha256"]
    assert set(hashes) == {p.name for p in published.iterdir()}
    assert hashes["config.json"] == sha256_file(published / "config.json")
    assert not (published / "remote-code-ran").exists()  # CXR_LLAVA_HF.py was never imported
    vision = imported.vision_variants["onnx-fp32"].parity
    llm = imported.llm_variants["gguf-f16"].parity
    assert vision["passed"] and vision["max_abs_diff"] < 1e-4
    assert llm["max_abs_diff_tokens"] < 2e-3 and llm["max_abs_diff_image"] < 2e-3


def test_vision_tower_matches_an_open_clip_forward_of_the_published_weights(published, imported):
    state = published_weights(published)
    gray = blocks_image().astype(np.float32) / 255
    pixels = preprocess(gray, imported.preprocess)[None]
    heads = CXR_LLAVA_VISION["width"] // CXR_LLAVA_VISION["head_width"]
    with torch.no_grad():
        want = open_clip_forward(state, torch.from_numpy(pixels), heads).numpy()
        no_ln_post = open_clip_forward(state, torch.from_numpy(pixels), heads, ln_post=False)
    session = onnx_session(imported.variant_file("vision", "onnx-fp32"), ["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels})[0]
    assert got.shape == want.shape == (1, 1024, LLM["hidden"])
    error = np.abs(got - want).max()
    assert error < 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(no_ln_post.numpy() - want).max() > 100 * error  # ln_post on every token: tested


def test_preprocessing_matches_cxr_llavas_image_processor(imported):
    import dataclasses

    from transformers import CLIPImageProcessor

    pre = imported.preprocess
    assert (pre.channels, pre.mean, pre.std) == (1, CXR_LLAVA_MEAN, CXR_LLAVA_STD)
    # CXRLLAVAModel.__init__'s processor (resample=True is Pillow's 1: Lanczos), given the
    # 8-bit 'L' image as an HxWx1 array, as generate_cxr_repsonse passes it
    processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 512}, resample=True, do_center_crop=True,
        crop_size=512, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=CXR_LLAVA_MEAN, image_std=CXR_LLAVA_STD, do_convert_rgb=False,
    )  # fmt: skip
    gray8 = blocks_image()
    theirs = processor(gray8[..., None], return_tensors="np")["pixel_values"][0]
    ours = preprocess(gray8.astype(np.float32) / 255, pre)
    assert ours.shape == theirs.shape == (1, 512, 512)
    levels = np.abs(ours - theirs).max() * CXR_LLAVA_STD * 255  # in 8-bit gray levels
    assert levels < 1.5  # their two 8-bit resampling passes round, ours stays in float
    bicubic = preprocess(
        gray8.astype(np.float32) / 255, dataclasses.replace(pre, interpolation="bicubic")
    )
    assert np.abs(bicubic - theirs).max() * CXR_LLAVA_STD * 255 > 5 * levels  # the filter: tested


def test_llm_matches_its_llama_model_and_separate_lm_head(published, imported):
    from transformers import LlamaConfig, LlamaModel

    from cxrlite.runtime.llamacpp import LlamaCppLLM

    llama = json.loads((published / "config.json").read_text())["llama"]
    state = published_weights(published)
    model = LlamaModel(LlamaConfig(**{k: llama[k] for k in cxr_llava.LLAMA_FIELDS if k in llama}))
    model.load_state_dict(
        {k.removeprefix("llama."): v for k, v in state.items() if k.startswith("llama.")}
    )
    ids = [1, 1, 5, 17, 33, 60, 100, 200, 319]
    with (
        torch.no_grad()
    ):  # CXRLLAVAModel.forward: hidden = self.llama(...)[0]; self.lm_head(hidden)
        hidden = model.eval()(torch.tensor([ids]))[0][0]
        want = F.linear(hidden, state["lm_head.weight"]).numpy()
        tied = F.linear(hidden, state["llama.embed_tokens.weight"]).numpy()
    gguf = imported.variant_file("llm", "gguf-f16")
    with LlamaCppLLM(gguf, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as runner:
        got = runner.eval_tokens(ids, all_logits=True)
    error = np.abs(got - want).max()
    assert got.shape == (len(ids), 320) and error < 2e-3  # bf16 weights as f16, f32 KV cache
    assert np.abs(tied - want).max() > 20 * error  # the untied lm_head is the one used


# --- the prompt, re-implemented from CXR_LLAVA_HF.py and transformers 4.36 ------------------


def sentencepiece_processors(model_file):
    """The tokenizer's SentencePiece model, and the same without its dummy prefix (what
    transformers' slow LlamaTokenizer loads when legacy is False)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_file.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    plain = spm.SentencePieceProcessor()
    plain.LoadFromSerializedProto(proto.SerializeToString())
    return sp, plain


def slow_llama_tokenizer(sp, plain, text, legacy):
    """transformers 4.36's slow LlamaTokenizer(text).input_ids (tokenize + BOS): the text split at
    special tokens written in it; legacy: each piece SentencePiece-encoded with its dummy prefix;
    not legacy: "▁" + text, pieces encoded without (after "<unk>" when they start with a space),
    a lone leading "▁" before a special token dropped."""
    if not legacy:
        text = "\u2581" + text.replace("\u2581", " ")
    pieces = []
    for part in re.split("(<unk>|<s>|</s>)", text):
        if part in SPECIAL:
            pieces.append(part)
        elif part and legacy:
            pieces += sp.encode(part, out_type=str)
        elif part.startswith(("\u2581", " ")):
            unk = len(plain.encode("<unk>"))
            pieces += plain.encode("<unk>" + part, out_type=str)[unk:]
        elif part:
            pieces += plain.encode(part, out_type=str)
    if not legacy and len(pieces) > 1 and pieces[0] == "\u2581" and pieces[1] in SPECIAL:
        pieces = pieces[1:]
    return [1] + [SPECIAL[p] if p in SPECIAL else sp.piece_to_id(p) for p in pieces]


def llama2_default_template(chat):
    """transformers 4.36's LlamaTokenizer.default_chat_template for a chat that starts with its
    system message (CXR_LLAVA_HF.py's apply_chat_template: the tokenizer has no template)."""
    system, text = chat[0]["content"], ""
    for i, message in enumerate(chat[1:]):
        content = message["content"]
        content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}" if i == 0 else content
        if message["role"] == "user":
            text += "<s>[INST] " + content.strip() + " [/INST]"
        else:
            text += " " + content.strip() + " </s>"
    return text


def tokenizer_image_token(prompt, encode, image_token_index):
    """CXR_LLAVA_HF.py's tokenizer_image_token, as written there."""
    prompt_chunks = [encode(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X), strict=True) for ele in sublist][:-1]

    input_ids, offset = [], 0
    if prompt_chunks and prompt_chunks[0] and prompt_chunks[0][0] == 1:
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [image_token_index] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


ANSWER = "The heart is normal. No effusion."
# write_radiologic_report's chat, then main.py's follow-up question
THEIR_CHATS = [
    [{"role": "system", "content": SYSTEM_PROMPT},
     {"role": "user", "content": "<image>\n" + FINDINGS_PROMPT}],
    [{"role": "system", "content": SYSTEM_PROMPT},
     {"role": "user", "content": "<image>\n" + FINDINGS_PROMPT},
     {"role": "assistant", "content": ANSWER},
     {"role": "user", "content": "What is possible diagnosis?"}],
]  # fmt: skip
OUR_FOLLOW_UP = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": FINDINGS_PROMPT}]},
    {"role": "assistant", "content": [{"type": "text", "text": ANSWER}]},
    {"role": "user", "content": [{"type": "text", "text": "What is possible diagnosis?"}]},
]


def their_ids(src, chat, legacy, image_id):
    sp, plain = sentencepiece_processors(src / "tokenizer.model")
    prompt = llama2_default_template(chat)
    encode = lambda text: slow_llama_tokenizer(sp, plain, text, legacy)  # noqa: E731
    ids = tokenizer_image_token(prompt, encode, IMAGE_TOKEN_INDEX)
    return [image_id if i == IMAGE_TOKEN_INDEX else i for i in ids]


def test_prompt_ids_are_cxr_llavas_own_conversation_and_tokenization(published, imported):
    runtime = Runtime.from_bundle(imported.path, warmup=False, threads=1)
    image_id = imported.config.image_token_id
    want = their_ids(published, THEIR_CHATS[0], legacy=False, image_id=image_id)
    assert want[:2] == [1, 1]  # their chunk's own "<s>" after the tokenizer's BOS
    assert runtime.prompt_ids(FINDINGS_PROMPT, with_image=True) == want
    follow_up = their_ids(published, THEIR_CHATS[1], legacy=False, image_id=image_id)
    assert runtime.prompt_ids(OUR_FOLLOW_UP, with_image=True) == follow_up
    report = runtime.report(blocks_image().astype(np.float32) / 255, max_tokens=4)
    assert report["impression"] is None and report["finish_reason"]["findings"] == "length"
    assert report["usage"] == {"prompt_tokens": len(want) - 1 + 1024, "completion_tokens": 4}
    runtime.close()


@pytest.mark.parametrize("legacy", [None, True])
def test_a_legacy_tokenizer_config_is_followed(published, tmp_path, legacy):
    """transformers 4.36 reads a tokenizer_config.json without `legacy` as legacy (transformers 5
    as not): the "[INST]" after "<s>" then takes a "▁"."""
    from cxrlite.model.tokenizer import encode_prompt_text, load_tokenizer, save_tokenizer

    src = shutil.copytree(published, tmp_path / "src")
    spec = json.loads((src / "tokenizer_config.json").read_text())
    if legacy is None:
        del spec["legacy"]
    else:
        spec["legacy"] = legacy
    (src / "tokenizer_config.json").write_text(json.dumps(spec))
    cfg, _ = cxr_llava._model_config(src, read_json(src / "config.json"))
    save_tokenizer(cxr_llava._tokenizer(src, cfg), tmp_path / "tokenizer")
    tokenizer = load_tokenizer(tmp_path / "tokenizer")  # as the runtime loads the bundle's
    for chat, messages in zip(THEIR_CHATS, [FINDINGS_PROMPT, OUR_FOLLOW_UP], strict=True):
        want = their_ids(src, chat, legacy=True, image_id=cfg.image_token_id)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": [{"type": "image"},
                                                      {"type": "text", "text": messages}]}]  # fmt: skip
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert encode_prompt_text(tokenizer, text, cfg) == want
    assert want != their_ids(src, THEIR_CHATS[1], legacy=False, image_id=cfg.image_token_id)


def test_cli_report_on_a_12_bit_dicom(imported, tmp_path):
    """Its own code refuses values above 255; cxrlite windows the DICOM to [0, 1], what an 8-bit
    export of the same window divided by 255 would give, without the rounding."""
    from cxrlite.imaging.decode import load_image
    from cxrlite.imaging.write import write_dicom

    stored = (blocks_image().astype(np.uint16) * 16 + 7).clip(0, 4095)
    dicom = write_dicom(tmp_path / "study.dcm", stored, bits_stored=12, window=(2048.0, 4096.0))
    pixels = load_image(dicom).pixels
    eight_bit = np.round(stored / 4095 * 255) / 255  # a viewer's 8-bit export of that window
    assert np.abs(pixels - eight_bit).max() <= 0.5 / 255 + 1e-6
    args = ["report", str(dicom), "--bundle", str(imported.path), "--max-tokens", "3"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "IMPRESSION: (none" in result.output


def _break(defect, src):
    config = json.loads((src / "config.json").read_text())
    if defect == "missing tokenizer":
        (src / "tokenizer.model").unlink()
    elif defect == "missing shard":
        (src / "model-00002-of-00002.safetensors").unlink()
    elif defect == "another model":
        config["model_type"] = "llava"
    elif defect == "unknown field":
        config["clip_vision_cfg"]["window"] = 7
    elif defect == "layer scale":
        config["clip_vision_cfg"]["ls_init_value"] = 0.1
    elif defect == "pooled tokens":
        config["clip_vision_cfg"]["final_ln_after_pool"] = True
    elif defect == "another image size":
        config["clip_vision_cfg"]["image_size"] = 448
    elif defect == "no bos":
        spec = json.loads((src / "tokenizer_config.json").read_text())
        (src / "tokenizer_config.json").write_text(json.dumps({**spec, "add_bos_token": False}))
    elif defect == "stray weight":
        from safetensors.torch import load_file, save_file

        shard = src / "model-00001-of-00002.safetensors"
        state = load_file(str(shard))
        state["vision_tower.transformer.resblocks.0.ls_1.gamma"] = torch.ones(2)
        save_file(state, str(shard))
    (src / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "defect, message",
    [
        ("missing tokenizer", "no tokenizer.model"),
        ("missing shard", "no model-00002-of-00002.safetensors"),
        ("another model", "model_type is 'llava'"),
        ("unknown field", "clip_vision_cfg has unknown fields ['window']"),
        ("layer scale", "clip_vision_cfg.ls_init_value is 0.1"),
        ("pooled tokens", "clip_vision_cfg.final_ln_after_pool is True"),
        ("another image size", "position_embedding.weight is (1025, 64), expected (785, 64)"),
        ("no bos", "add_bos_token is False"),
        ("stray weight", "unexpected weights ['transformer.resblocks.0.ls_1.gamma']"),
        ("licence not accepted", "pass --accept-license"),
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(published, tmp_path, defect, message):
    src = shutil.copytree(published, tmp_path / "src")
    _break(defect, src)
    args = ["import", "cxr-llava", str(src), "--out", str(tmp_path / "out")]
    if defect != "licence not accepted":
        args.append("--accept-license")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoint").exists()
    assert not list(tmp_path.glob(".tmp-*")) and not (src / "remote-code-ran").exists()
