"""export_llava: the folder loads as transformers' LlavaForConditionalGeneration, same logits."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from cxrlite.model.checkpoint import save
from cxrlite.model.config import get_preset
from cxrlite.model.llava import export_llava
from cxrlite.model.tokenizer import bind_tokenizer, encode_example, train_tokenizer
from cxrlite.model.vlm import CXRVLM

WORDS = "heart size normal enlarged pleural effusion left right lung clear Effusion? Left. Heart Normal.".split()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(200)]
    return train_tokenizer(corpus, get_preset("tiny"), tmp_path_factory.mktemp("tok"))


def checkpoint(tokenizer, tmp_path, **overrides):
    cfg = bind_tokenizer(get_preset("tiny", **overrides), tokenizer)
    torch.manual_seed(0)
    model = CXRVLM(cfg).eval()
    with torch.no_grad():  # give the projector and LLM weights of a trained model's scale
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, cfg, save(model, tokenizer, cfg, tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("overrides", "strategy"),
    [
        ({}, "full"),  # SigLIP, last layer, tied embeddings
        (
            {
                "vision": {"kind": "clip", "feature_layer": -2},
                "llm": {"tie_word_embeddings": False},
            },
            "default",
        ),
    ],
)
def test_llava_logits_match(tokenizer, tmp_path, overrides, strategy):
    model, cfg, ckpt = checkpoint(tokenizer, tmp_path, **overrides)
    out = export_llava(ckpt, tmp_path / "llava")

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llava"
    assert config["image_token_index"] == cfg.image_token_id == 4
    assert config["vision_feature_select_strategy"] == strategy
    assert config["vision_feature_layer"] == cfg.vision.feature_layer
    assert config["projector_hidden_act"] == "gelu"

    llava, info = LlavaForConditionalGeneration.from_pretrained(
        out, local_files_only=True, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    llava.eval()

    exported_tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    rows = [
        encode_example(exported_tokenizer, q, a, with_image=True, n_image_tokens=cfg.n_image_tokens)
        for q, a in (("Effusion?", "Left."), ("Heart size?", "Normal."))
    ]
    assert (
        rows[0]["input_ids"]
        == encode_example(
            tokenizer, "Effusion?", "Left.", with_image=True, n_image_tokens=cfg.n_image_tokens
        )["input_ids"]
    )
    width = max(len(r["input_ids"]) for r in rows)
    assert width <= 32
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r["input_ids"] + [pad] * (width - len(r["input_ids"])) for r in rows])
    mask = (ids != pad).long()
    pixels = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids, mask, pixels=pixels).logits
        theirs = llava(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert ours.abs().max() > 0.1  # not a degenerate comparison
    assert (ours - theirs).abs().max().item() <= 1e-4

    # Exporting again replaces our own export folder.
    export_llava(ckpt, out)
    assert (out / "cxrlite_export.json").is_file()


def test_qformer_checkpoint_is_refused(tokenizer, tmp_path):
    _, _, ckpt = checkpoint(tokenizer, tmp_path, bridger={"kind": "qformer"})
    with pytest.raises(ValueError, match="qformer bridger"):
        export_llava(ckpt, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()


def test_export_refuses_foreign_folder(tokenizer, tmp_path):
    _, _, ckpt = checkpoint(tokenizer, tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.bin").write_bytes(b"1")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        export_llava(ckpt, tmp_path / "mine")
