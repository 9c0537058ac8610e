"""export_llava: the folder loads as transformers' LlavaForConditionalGeneration, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from export_testkit import make_checkpoint
from transformers import AutoTokenizer, LlavaForConditionalGeneration

from cxrlite.model.llava import export_llava
from cxrlite.model.tokenizer import encode_example

# The other feature selection LLaVA knows: CLIP without CLS, second-to-last layer, and an LM
# head of its own (the tiny preset is SigLIP, last layer, tied embeddings).
CLIP_UNTIED = {
    "vision": {"kind": "clip", "feature_layer": -2},
    "llm": {"tie_word_embeddings": False},
}


@pytest.mark.parametrize(
    ("overrides", "strategy"),
    [({}, "full"), (CLIP_UNTIED, "default")],
    ids=["siglip", "clip-untied"],
)
def test_llava_logits_match(tiny_checkpoint, tiny_tokenizer, tmp_path, overrides, strategy):
    tokenizer = tiny_tokenizer
    if overrides:
        model, ckpt = make_checkpoint(tmp_path, tokenizer=tokenizer, **overrides)
    else:
        model, ckpt = tiny_checkpoint("mlp")
    cfg = model.cfg
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
    assert min(len(r["input_ids"]) for r in rows) < width  # padding and its mask take part
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


def test_qformer_checkpoint_is_refused(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint("qformer")
    with pytest.raises(ValueError, match="qformer bridger"):
        export_llava(ckpt, tmp_path / "llava")
    assert not (tmp_path / "llava").exists()


def test_export_refuses_foreign_folder(tiny_checkpoint, tmp_path):
    _, ckpt = tiny_checkpoint("mlp")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.bin").write_bytes(b"1")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        export_llava(ckpt, tmp_path / "mine")
