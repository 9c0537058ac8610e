"""GGUF export, llama.cpp parity (text and image embeddings), quantization, low-level runtime."""

from __future__ import annotations

import json
import random

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch

from cxrlite.export.gguf import GGUFExportError, gguf_parity, read_vocab, write_gguf
from cxrlite.model.checkpoint import save
from cxrlite.model.config import get_preset
from cxrlite.model.tokenizer import bind_tokenizer, load_pretrained_tokenizer, train_tokenizer
from cxrlite.model.vlm import CXRVLM
from cxrlite.quantize.gguf import (
    GGUFQuantizeError,
    compute_imatrix,
    gguf_tensor_types,
    quantize_gguf,
)
from cxrlite.runtime.llamacpp import LlamaCppError, LlamaCppLLM

WORDS = "heart size normal enlarged pleural effusion left right lung clear Effusion? Left.".split()
PROMPT = [1, 277, 300, 12, 90, 4, 150, 151, 152, 200, 201, 2]


def corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(200)]


def make_checkpoint(tokenizer, path, **overrides):
    cfg = bind_tokenizer(get_preset("tiny", **overrides), tokenizer)
    torch.manual_seed(0)
    model = CXRVLM(cfg).eval()
    with torch.no_grad():  # weights of a trained model's scale, not init's near-zero ones
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, save(model, tokenizer, cfg, path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(corpus(), get_preset("tiny"), tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model, ckpt = make_checkpoint(tokenizer, root / "ckpt")
    return {
        "model": model,
        "ckpt": ckpt,
        "f32": write_gguf(ckpt, root / "llm-f32.gguf", "f32"),
        "f16": write_gguf(ckpt, root / "llm-f16.gguf", "f16"),
        "root": root,
    }


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model.llm(input_ids=torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("tied", [True, False])
def test_f32_parity_with_text_and_image_embeddings(tokenizer, exported, tmp_path, tied):
    if tied:
        ckpt, path = exported["ckpt"], exported["f32"]
    else:
        _, ckpt = make_checkpoint(tokenizer, tmp_path / "ckpt", llm={"tie_word_embeddings": False})
        path = write_gguf(ckpt, tmp_path / "llm.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    # a tied lm_head is left out (llama.cpp reuses token_embd); an untied one is written
    assert ("output.weight" in names) is not tied
    result = gguf_parity(ckpt, path, prompts=[PROMPT, PROMPT[:5]])
    # exact f32 path (f32 KV cache, no flash attention): float rounding only
    assert result["max_abs_diff_tokens"] <= 1e-4
    assert result["max_abs_diff_image"] <= 1e-4
    # llama.cpp's defaults (f16 KV cache + flash attention) round the cache to f16
    assert result["max_abs_diff_runtime"] <= 1e-2
    assert result["max_abs_logit"] > 0.5  # logits are not all ~0, so the diffs mean something
    assert result["n_positions"] == len(PROMPT) + 5


def test_f16_file_keeps_norms_f32_and_is_close(exported):
    tensors = {t.name: t for t in gguf.GGUFReader(str(exported["f16"])).tensors}
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    size16, size32 = exported["f16"].stat().st_size, exported["f32"].stat().st_size
    assert 0.45 < size16 / size32 < 0.6
    result = gguf_parity(exported["ckpt"], exported["f16"], prompts=[PROMPT])
    assert 1e-5 < result["max_abs_diff_tokens"] <= 1e-2  # f16 weights: rounding shows, but small
    assert result["max_abs_diff_image"] <= 1e-2


def test_llama3_rope_scaling_parity(tokenizer, tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    llm = {"rope_scaling": rope, "rope_theta": 500000.0}
    model, ckpt = make_checkpoint(tokenizer, tmp_path / "ckpt", llm=llm)
    path = write_gguf(ckpt, tmp_path / "llm.gguf", "f32")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "rope_freqs.weight" in names  # llama.cpp's carrier of Llama-3 frequency scaling
    prompt = [1, *range(10, 70)]
    assert gguf_parity(ckpt, path, prompts=[prompt])["max_abs_diff_tokens"] <= 1e-4
    plain, _ = make_checkpoint(tokenizer, tmp_path / "plain", llm={"rope_theta": 500000.0})
    # the scaling changes the logits, so matching them above means the factors were applied
    assert np.abs(torch_logits(plain, prompt) - torch_logits(model, prompt)).max() > 1e-3


def test_metadata_and_tokenizer_round_trip(tokenizer, exported):
    fields = gguf.GGUFReader(str(exported["f32"])).fields

    def value(key):
        return fields[key].contents()

    sp = spm.SentencePieceProcessor(model_file=str(exported["ckpt"] / "tokenizer.model"))
    assert value("general.architecture") == "llama"
    assert value("tokenizer.ggml.model") == "llama"
    assert value("tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert np.allclose(value("tokenizer.ggml.scores"), [sp.get_score(i) for i in range(384)])
    types = value("tokenizer.ggml.token_type")
    assert types[:5] == [2, 3, 3, 3, 4]  # <unk> unknown, <s> </s> <pad> control, <image> user
    assert types[sp.piece_to_id("<0x41>")] == gguf.TokenType.BYTE
    assert types[sp.piece_to_id("▁heart")] == gguf.TokenType.NORMAL
    assert value("tokenizer.ggml.bos_token_id") == 1
    assert value("tokenizer.ggml.eos_token_id") == 2
    assert value("tokenizer.ggml.unknown_token_id") == 0
    assert value("tokenizer.ggml.padding_token_id") == 3
    assert value("tokenizer.ggml.add_bos_token") is True
    assert value("tokenizer.chat_template") == tokenizer.chat_template
    assert value("llama.context_length") == 256
    assert value("llama.embedding_length") == 64
    assert value("llama.block_count") == 2
    assert value("llama.feed_forward_length") == 192
    assert value("llama.attention.head_count") == 4
    assert value("llama.attention.head_count_kv") == 2
    assert value("llama.rope.dimension_count") == 16
    assert value("llama.rope.freq_base") == 10000.0
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert value("llama.vocab_size") == 384
    with LlamaCppLLM(exported["f32"], n_ctx=32) as llm:  # llama.cpp reads it all back
        assert (llm.n_vocab, llm.n_embd) == (384, 64)
        assert llm.metadata("tokenizer.chat_template") == tokenizer.chat_template
        assert llm.metadata("no.such.key") is None


@pytest.mark.parametrize(
    ("qtype", "tolerance", "main_type"),
    [("q8_0", 0.1, "Q8_0"), ("q4_k_m", 0.6, "Q5_0")],  # fewer bits, a wider tolerance
)
def test_quantized_files_load_and_stay_close(exported, qtype, tolerance, main_type):
    out = quantize_gguf(exported["f16"], exported["root"] / f"llm-{qtype}.gguf", qtype)
    assert out.stat().st_size < exported["f16"].stat().st_size
    kinds = gguf_tensor_types(out)
    # tiny rows (64, 192) are multiples of 32 but not of 256: Q4_K falls back to Q5_0, none to F16
    assert max(kinds, key=kinds.get) == main_type
    assert "F16" not in kinds
    expected = torch_logits(exported["model"], PROMPT)
    with LlamaCppLLM(out, n_ctx=64) as llm:
        got = llm.eval_tokens(PROMPT, all_logits=True)
    assert np.isfinite(got).all()
    diff = float(np.abs(got - expected).max())
    assert 1e-4 < diff <= tolerance


def test_bad_quantization_requests(exported, tmp_path):
    with pytest.raises(GGUFQuantizeError, match="unknown GGUF quantization type 'q4_km'.*q4_k_m"):
        quantize_gguf(exported["f16"], tmp_path / "x.gguf", "q4_km")
    with pytest.raises(GGUFQuantizeError, match="needs an importance matrix"):
        quantize_gguf(exported["f16"], tmp_path / "x.gguf", "iq2_xxs")
    with pytest.raises(GGUFQuantizeError, match="not found"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_imatrix_enables_iq_types(exported, tmp_path):
    imatrix = compute_imatrix(exported["ckpt"], corpus()[:8])
    linear = {t.name for t in gguf.GGUFReader(str(exported["f16"])).tensors if "blk." in t.name}
    linear = {n for n in linear if not n.endswith("norm.weight")}
    assert linear <= set(imatrix)  # every block linear has its importance vector
    assert imatrix["blk.0.ffn_down.weight"].shape == (192,)
    assert all((v >= 0).all() and np.isfinite(v).all() for v in imatrix.values())
    out = quantize_gguf(exported["f16"], tmp_path / "iq2.gguf", "iq2_xxs", imatrix=imatrix)
    with LlamaCppLLM(out, n_ctx=32) as llm:
        assert np.isfinite(llm.eval_tokens(PROMPT)).all()


def test_runtime_rejects_bad_input_and_generates(exported):
    with LlamaCppLLM(exported["f32"], n_ctx=16, n_batch=8) as llm:
        assert llm.n_ctx == 256  # llama.cpp rounds the context up; the object reports the truth
        with pytest.raises(LlamaCppError, match="outside the vocabulary"):
            llm.eval_tokens([1, 999])
        with pytest.raises(LlamaCppError, match="embeddings must be"):
            llm.eval([np.zeros((2, 63), dtype=np.float32)])
        with pytest.raises(LlamaCppError, match="exceed the context"):
            llm.eval_tokens([5] * 257)
        assert llm.n_past == 0
        # 12 tokens in batches of 8, logits of every position: same as one pass in transformers
        got = llm.eval_tokens(PROMPT, all_logits=True)
        assert np.abs(got - torch_logits(exported["model"], PROMPT)).max() < 1e-2
        llm.reset()
        first = int(torch_logits(exported["model"], PROMPT[:4])[-1].argmax())
        assert llm.generate_greedy([PROMPT[:4]], 5, stop_ids=[first]) == []
        llm.reset()
        prompt = [1] + [300] * 249
        out = llm.generate_greedy([prompt], max_new_tokens=20)
        assert len(out) == 256 - 250 + 1  # stopped when the context was full
        assert all(0 <= t < 384 for t in out)
    with pytest.raises(LlamaCppError, match="not found"):
        LlamaCppLLM(exported["root"] / "missing.gguf")


def test_export_errors(exported, tmp_path):
    with pytest.raises(GGUFExportError, match="dtype"):
        write_gguf(exported["ckpt"], tmp_path / "x.gguf", "q4")
    wordpiece = tmp_path / "wp"
    wordpiece.mkdir()
    (wordpiece / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}, "decoder": None})
    )
    with pytest.raises(GGUFExportError, match="SentencePiece .*byte-level BPE"):
        read_vocab(wordpiece, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wp"]


def test_llama3_style_bpe_tokenizer(tmp_path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
        r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    bpe = Tokenizer(models.BPE(ignore_merges=True))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus(), trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=specials[0], eos_token=specials[1]
    ).save_pretrained(tmp_path / "pretrained")
    base = get_preset("tiny", llm={"vocab_size": 320})
    tokenizer = load_pretrained_tokenizer(tmp_path / "pretrained", base)
    _, ckpt = make_checkpoint(tokenizer, tmp_path / "ckpt", llm={"vocab_size": 320})
    path = write_gguf(ckpt, tmp_path / "bpe.gguf", "f32")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "llama-bpe"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[300] == "<image>" and tokens[319] == "[PAD319]"
    assert fields["tokenizer.ggml.token_type"].contents()[300] == gguf.TokenType.CONTROL
    assert len(fields["tokenizer.ggml.merges"].contents()) > 10
    ids = tokenizer.encode("heart size normal")
    result = gguf_parity(ckpt, path, prompts=[ids])
    assert result["max_abs_diff_tokens"] <= 1e-4
    assert result["max_abs_diff_image"] <= 1e-4
