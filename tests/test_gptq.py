"""GPTQ: shape rules, standard-format files, CPU inference against the model's own dequantized
weights, greedy generation."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM

from cxrlite.model.checkpoint import save
from cxrlite.model.config import get_preset
from cxrlite.model.language import hf_llm_config
from cxrlite.model.tokenizer import bind_tokenizer, train_tokenizer
from cxrlite.model.vlm import CXRVLM
from cxrlite.quantize.gptq import check_gptq_shapes, quantize_gptq
from cxrlite.runtime.gptq import GPTQError, dequantize_gptq, gptq_format_check, load_gptq_llm

WORDS = "heart size normal enlarged pleural effusion left right lung clear Effusion? Left.".split()


def texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(24)) for _ in range(n)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    tokenizer = train_tokenizer(texts(200, 0), get_preset("tiny"), root / "tok")
    # hidden 64, intermediate 128: every width packs (multiple of 8) and takes group_size 32
    cfg = bind_tokenizer(get_preset("tiny", llm={"intermediate_size": 128}), tokenizer)
    torch.manual_seed(0)
    model = CXRVLM(cfg).eval()
    return model, tokenizer, cfg, save(model, tokenizer, cfg, root / "ckpt")


@pytest.fixture(scope="module")
def quantized(checkpoint, tmp_path_factory):
    *_, ckpt = checkpoint
    out = tmp_path_factory.mktemp("gptq-out") / "llm-gptq"
    with pytest.MonkeyPatch.context() as env:
        # GPTQModel's Python packing: its C++ one is compiled on first use, which is slow
        env.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
        return quantize_gptq(ckpt, out, texts(16, 1), bits=4, group_size=32)


def test_shape_rules():
    odd = get_preset("tiny", llm={"intermediate_size": 172}).llm  # not a multiple of 8
    with pytest.raises(GPTQError, match="mlp.down_proj has 172 input features"):
        check_gptq_shapes(odd, bits=4, group_size=-1)
    ok = get_preset("tiny", llm={"intermediate_size": 128}).llm
    check_gptq_shapes(ok, bits=4, group_size=32)
    check_gptq_shapes(ok, bits=8, group_size=-1)
    with pytest.raises(GPTQError, match="group_size 48 does not divide"):
        check_gptq_shapes(ok, bits=4, group_size=48)
    with pytest.raises(GPTQError, match="bits must be one of"):
        check_gptq_shapes(ok, bits=3, group_size=32)
    gemma3 = get_preset(
        "tiny", llm={"arch": "gemma3", "sliding_window": 8, "rope_local_theta": 1e4}
    ).llm
    with pytest.raises(GPTQError, match="Llama-family LLM; this one is gemma3"):
        check_gptq_shapes(gemma3, bits=4, group_size=32)


def test_bad_requests_fail_before_quantizing(checkpoint, tmp_path):
    *_, ckpt = checkpoint
    with pytest.raises(GPTQError, match="does not divide"):
        quantize_gptq(ckpt, tmp_path / "out", texts(4, 1), group_size=128)
    with pytest.raises(GPTQError, match="at least 10 tokens"):
        quantize_gptq(ckpt, tmp_path / "out", ["heart"], group_size=32)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("keep me")
    with pytest.raises(GPTQError, match="refusing to replace"):
        quantize_gptq(ckpt, tmp_path / "foreign", texts(16, 1), group_size=32)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign"]


def test_standard_gptq_format(quantized):
    info = gptq_format_check(quantized)
    assert info == {
        "bits": 4,
        "group_size": 32,
        "desc_act": False,
        "sym": True,
        "format": "gptq",
        "n_quantized": 14,  # 7 linears x 2 layers
        "n_tensors": 4 * 14 + 6,  # + embeddings, final norm, 2 x 2 layer norms
    }
    quant = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "gptq" and quant["checkpoint_format"] == "gptq"
    assert (quantized / "tokenizer.model").is_file()
    assert (quantized / "tokenizer_config.json").is_file()


def test_format_check_rejects_gptq_v2(quantized, tmp_path):
    copy = tmp_path / "v2"
    shutil.copytree(quantized, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["checkpoint_format"] = "gptq_v2"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(GPTQError, match="format 'gptq_v2'"):
        gptq_format_check(copy)


def test_cpu_inference_matches_dequantized_weights(checkpoint, quantized):
    model, tokenizer, cfg, _ = checkpoint
    reference = LlamaForCausalLM(hf_llm_config(cfg.llm))
    result = reference.load_state_dict(dequantize_gptq(quantized), strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == ["lm_head.weight"]  # tied
    reference.tie_weights()
    reference.eval()
    llm = load_gptq_llm(quantized, dtype=torch.float16)
    ids = torch.tensor([tokenizer.encode("heart size normal left pleural effusion lung clear")])
    with torch.no_grad():
        got = llm(ids).logits.float()
        expected = reference(ids).logits
        original = model.llm(ids).logits
    assert torch.isfinite(got).all()
    # same weights, fp16 activations: only activation rounding differs
    assert (got - expected).abs().max() < 3e-3
    # 4-bit rounding itself moves the logits far more, so the match above is not trivial
    assert (expected - original).abs().max() > 5e-3
    generated = llm.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 8)
    assert int(generated.max()) < cfg.llm.vocab_size
