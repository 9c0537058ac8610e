"""Model config validation, parameter counts, forward shapes, the image merge, checkpoints."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from cxrlite.model.checkpoint import CheckpointError, load, save
from cxrlite.model.config import PRESETS, ModelConfig, count_parameters, get_preset
from cxrlite.model.language import llm_config_from_pretrained
from cxrlite.model.tokenizer import (
    bind_tokenizer,
    build_tokenizer,
    encode_example,
    load_tokenizer,
    train_tokenizer,
)
from cxrlite.model.vision import vision_config_from_pretrained
from cxrlite.model.vlm import CXRVLM

WORDS = (
    "heart size normal enlarged pleural effusion left right small large lung clear no acute "
    "Effusion? Heart? Left. Large"
).split()


def corpus() -> list[str]:
    rng = random.Random(0)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) + "." for _ in range(200)
    ]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(corpus(), get_preset("tiny"), tmp_path_factory.mktemp("tok"))


def make(tokenizer, **overrides) -> tuple[CXRVLM, ModelConfig]:
    cfg = bind_tokenizer(get_preset("tiny", **overrides), tokenizer)
    torch.manual_seed(0)
    return CXRVLM(cfg).eval(), cfg


def batch(tokenizer, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Two right-padded examples, 32 positions at most."""
    pad = tokenizer.pad_token_id
    rows = [
        encode_example(tokenizer, q, a, with_image=True, n_image_tokens=cfg.n_image_tokens)
        for q, a in (("Effusion?", "Left."), ("Heart?", "Large heart."))
    ]
    width = max(len(r["input_ids"]) for r in rows)
    assert width <= 32
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
    labels = torch.tensor([r["labels"] + [-100] * (width - len(r["labels"])) for r in rows])
    torch.manual_seed(1)
    pixels = torch.randn(2, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size)
    return {
        "input_ids": ids,
        "attention_mask": (ids != pad).long(),
        "labels": labels,
        "pixels": pixels,
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"vision": {"hidden_size": 30, "num_heads": 4}}, "not divisible by num_heads"),
        ({"llm": {"num_kv_heads": 3}}, "does not divide num_heads"),
        ({"llm": {"hidden_size": 66}}, "not divisible by num_heads"),
        ({"vision": {"image_size": 8}}, "smaller than patch_size"),
        ({"vision": {"feature_layer": 3}}, "feature_layer 3"),
        ({"vision": {"feature_layer": 0}}, "feature_layer 0"),
        ({"vision": {"kind": "vit"}}, "VisionConfig.kind"),
        (
            {"bridger": {"kind": "qformer", "hidden_size": 30, "num_heads": 4}},
            "Q-Former hidden_size",
        ),
        ({"llm": {"vocab_size": 3}}, "pad_token_id 3 is outside"),
        ({"image_token_id": 999}, "image_token_id 999"),
        ({"prompt_template": "alpaca"}, "prompt_template"),
        ({"preprocess": {"image_size": 32, "channels": 1}}, "vision encoder takes 1x64px"),
        ({"llm": {"n_layers": 2}}, "unknown llm field"),
        ({"llm": {"arch": "gpt2"}}, "LLMConfig.arch"),
        ({"llm": {"sliding_window": 8}}, "sliding_window and rope_local_theta"),
        ({"bridger": {"kind": "gemma3", "tokens_per_image": 15}}, "a square number"),
        ({"bridger": {"kind": "gemma3", "tokens_per_image": 9}}, "must divide evenly"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_preset("tiny", **overrides)


def test_config_json_round_trip_and_errors():
    for name in PRESETS:
        cfg = get_preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
    data = get_preset("tiny").to_dict()
    data["vision"]["depth"] = 3
    with pytest.raises(ValueError, match=r"VisionConfig: unknown field\(s\) \['depth'\]"):
        ModelConfig.from_dict(data)


def test_derived_shapes():
    assert get_preset("tiny").n_image_tokens == 16  # (64 / 16) ** 2 patches
    assert get_preset("tiny", bridger={"kind": "qformer"}).n_image_tokens == 4
    assert get_preset("small").n_image_tokens == 64
    assert get_preset("so400m-llama7b").n_image_tokens == 27 * 27  # 384 px / patch 14, floored
    assert get_preset("vitb16-llama1b").vision.select_strategy == "default"  # CLIP drops CLS


def test_count_parameters_of_real_shapes():
    # Published sizes: Llama-3.2-1B, Llama-2-7B, CLIP ViT-B/16 vision tower (no projection).
    assert count_parameters(get_preset("vitb16-llama1b"))["llm"] == 1_235_814_400
    assert count_parameters(get_preset("so400m-llama7b"))["llm"] == 6_738_415_616
    assert count_parameters(get_preset("vitb16-llama1b"))["vision"] == 85_799_424
    # MedGemma 4B (Gemma 3 4B + SigLIP-SO400M at 896 px + its projector): "4.3B parameters"
    medgemma = get_preset("siglip896-gemma3-4b")
    assert count_parameters(medgemma)["total"] == 4_300_079_472
    assert medgemma.n_image_tokens == 256 and medgemma.llm.head_size == 256


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"bridger": {"kind": "qformer"}},
        {"vision": {"kind": "clip"}, "llm": {"tie_word_embeddings": False}},
        {"vision": {"use_head": True}},
        {"vision": {"kind": "dinov2", "feature_norm": True}, "bridger": {"mlp_layers": 4}},
        {
            "vision": {"patch_size": 8, "feature_norm": True},
            "bridger": {"kind": "gemma3", "tokens_per_image": 16},
            "llm": {
                "arch": "gemma3",
                "head_dim": 32,
                "sliding_window": 8,
                "rope_local_theta": 10000.0,
            },
        },
    ],
)
def test_count_parameters_equals_built_model(tokenizer, overrides):
    model, cfg = make(tokenizer, **overrides)
    counts = count_parameters(cfg)
    for part in ("vision", "bridger", "llm"):
        assert sum(p.numel() for p in getattr(model, part).parameters()) == counts[part], part
    assert sum(p.numel() for p in model.parameters()) == counts["total"]


def test_count_parameters_equals_built_small():
    cfg = get_preset("small").replace(image_token_id=4)
    model = CXRVLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"] == 4_343_424


@pytest.mark.parametrize("kind", ["mlp", "qformer"])
def test_forward_shapes(tokenizer, kind):
    model, cfg = make(tokenizer, bridger={"kind": kind})
    b = batch(tokenizer, cfg)
    image = model.encode_image(b["pixels"])
    assert image.shape == (2, cfg.n_image_tokens, cfg.llm.hidden_size)
    out = model(b["input_ids"], b["attention_mask"], pixels=b["pixels"], labels=b["labels"])
    assert out.logits.shape == (*b["input_ids"].shape, cfg.llm.vocab_size)
    assert torch.isfinite(out.loss) and 4.0 < out.loss.item() < 8.0  # ~ln(384) at init
    out.loss.backward()
    assert model.bridger.parameters().__next__().grad is not None


def test_dinov2_features_are_transformers_own_normed_output_without_cls(tokenizer):
    """feature_norm + last layer = Dinov2Model's last_hidden_state (its final LayerNorm applied),
    CLS dropped; without feature_norm the raw hidden state of the chosen layer."""
    model, cfg = make(tokenizer, vision={"kind": "dinov2", "feature_norm": True})
    pixels = batch(tokenizer, cfg)["pixels"]
    with torch.no_grad():
        out = model.vision(pixel_values=pixels)
        assert torch.allclose(
            model.encode_image(pixels), model.bridger(out.last_hidden_state[:, 1:])
        )
        raw = model.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        plain = CXRVLM(
            cfg.replace(
                vision=dataclasses.replace(cfg.vision, feature_norm=False, feature_layer=-2)
            )
        )
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(plain.encode_image(pixels), model.bridger(raw[:, 1:]))
    assert cfg.n_image_tokens == cfg.vision.n_patches == 16


def test_image_merge_replaces_only_image_positions(tokenizer):
    model, cfg = make(tokenizer)
    b = batch(tokenizer, cfg)
    ids = b["input_ids"]
    merged = model.embed_inputs(ids, b["pixels"])
    text = model.llm.get_input_embeddings()(ids)
    image = model.encode_image(b["pixels"])
    mask = ids == cfg.image_token_id
    assert mask.sum(1).tolist() == [cfg.n_image_tokens] * 2
    assert torch.equal(merged[~mask], text[~mask])
    for row in range(2):  # image i fills the image positions of row i, in order
        assert torch.equal(merged[row][mask[row]], image[row])
    with pytest.raises(ValueError, match="16 image-token positions but 32 image embeddings"):
        model.embed_inputs(ids[:1], b["pixels"])


def test_generate_is_greedy(tokenizer):
    model, cfg = make(tokenizer)
    with torch.no_grad():
        for p in model.llm.parameters():  # a random init this small repeats one token; spread it
            p.normal_(0, 0.3)
    ids = torch.tensor(
        [
            encode_example(tokenizer, "Effusion?", None, with_image=True, n_image_tokens=16)[
                "input_ids"
            ]
        ]
    )
    pixels = batch(tokenizer, cfg)["pixels"][:1]
    generated = model.generate(ids, pixels=pixels, max_new_tokens=6, eos_token_id=-1)
    expected, seq = [], ids
    with torch.no_grad():
        for _ in range(6):
            token = int(model(seq, pixels=pixels).logits[0, -1].argmax())
            expected.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    assert generated[0].tolist() == expected
    assert len(set(expected)) > 1


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "bridger": {"kind": "qformer"},
            "vision": {"kind": "clip"},
            "llm": {"tie_word_embeddings": False},
        },
        {"vision": {"kind": "dinov2", "feature_layer": -2}, "bridger": {"mlp_layers": 3}},
    ],
)
def test_save_load_round_trip(tokenizer, tmp_path, overrides):
    model, cfg = make(tokenizer, **overrides)
    b = batch(tokenizer, cfg)
    save(model, tokenizer, cfg, tmp_path / "ckpt")
    loaded, tok2, cfg2 = load(tmp_path / "ckpt")
    assert cfg2 == cfg and not loaded.training
    assert tok2.encode("USER: <image>\nHeart?") == tokenizer.encode("USER: <image>\nHeart?")
    with torch.no_grad():
        before = model(b["input_ids"], b["attention_mask"], pixels=b["pixels"]).logits
        after = loaded(b["input_ids"], b["attention_mask"], pixels=b["pixels"]).logits
    assert torch.equal(before, after)
    tied = (
        loaded.llm.lm_head.weight.data_ptr() == loaded.llm.get_input_embeddings().weight.data_ptr()
    )
    assert tied == cfg.llm.tie_word_embeddings
    # Saving again over our own checkpoint replaces it.
    save(loaded, tok2, cfg2, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_checkpoint_errors(tokenizer, tmp_path):
    model, cfg = make(tokenizer)
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "nothing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        save(model, tokenizer, cfg, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    with pytest.raises(CheckpointError, match="no config.json"):
        load(tmp_path / "other")
    ckpt = save(model, tokenizer, cfg, tmp_path / "ckpt")
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load(ckpt)
    (ckpt / "config.json").write_text('{"format": "someone-else"}')
    with pytest.raises(CheckpointError, match="not a cxrlite checkpoint"):
        load(ckpt)


def test_builds_from_local_pretrained_folders(tmp_path):
    """A folder saved with save_pretrained (random tiny SigLIP / Llama) loads as the encoder / LLM."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaTokenizer,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    torch.manual_seed(0)
    vision = SiglipVisionModel(
        SiglipVisionConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32,
                           num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )  # fmt: skip
    vision.save_pretrained(tmp_path / "siglip")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3} | {f"<0x{i:02X}>": 4 + i for i in range(256)}
    LlamaTokenizer(vocab=vocab, merges=[]).save_pretrained(tmp_path / "llama")
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=128)
    )  # fmt: skip
    llm.save_pretrained(tmp_path / "llama")

    cfg = get_preset(
        "tiny",
        vision=vision_config_from_pretrained(tmp_path / "siglip"),
        llm=llm_config_from_pretrained(tmp_path / "llama"),
    )
    assert (
        cfg.vision.feature_layer == -2
        and cfg.n_image_tokens == 16
        and cfg.preprocess["channels"] == 3
    )
    tok = build_tokenizer(cfg, tmp_path / "tok")
    cfg = bind_tokenizer(cfg, tok)
    assert cfg.image_token_id == 260 and cfg.llm.vocab_size == 261 and tok.pad_token == "<unk>"
    assert tok.image_token == "<image>"
    reloaded = load_tokenizer(tmp_path / "tok")  # build_tokenizer saved it there
    assert reloaded.convert_tokens_to_ids("<image>") == 260 and reloaded.image_token == "<image>"
    model = CXRVLM(cfg)
    loaded = model.vision.state_dict()
    assert loaded.keys() == vision.state_dict().keys()
    for name, tensor in vision.state_dict().items():
        assert torch.equal(loaded[name], tensor), name
    embed = model.llm.get_input_embeddings().weight
    assert embed.shape == (261, 64)
    assert torch.equal(embed[:260], llm.get_input_embeddings().weight)
    assert torch.equal(
        model.llm.model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight
    )
    ids = torch.tensor(
        [encode_example(tok, "Heart?", None, with_image=True, n_image_tokens=16)["input_ids"]]
    )
    assert model(ids, pixels=torch.randn(1, 3, 32, 32)).logits.shape == (1, ids.shape[1], 261)
