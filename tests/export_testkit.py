"""Tiny checkpoints for the export and bundle tests (imported by test_export_onnx, test_bundle)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from cxrlite.model.checkpoint import save
from cxrlite.model.config import get_preset
from cxrlite.model.tokenizer import bind_tokenizer, build_tokenizer
from cxrlite.model.vlm import CXRVLM

WORDS = (
    "heart size normal enlarged pleural effusion left right small large lung clear no acute "
    "pneumothorax consolidation nodule edema"
).split()


def report_corpus() -> list[str]:
    rng = random.Random(0)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "." for _ in range(150)
    ]


def make_checkpoint(root: Path, bridger: str = "mlp") -> tuple[CXRVLM, Path]:
    """A tiny checkpoint whose weights are perturbed away from their init (a trained model's
    scale), saved under root/ckpt-<bridger>."""
    cfg = get_preset("tiny", bridger={"kind": bridger})
    tokenizer = build_tokenizer(cfg, root / f"tok-{bridger}", corpus=report_corpus())
    cfg = bind_tokenizer(cfg, tokenizer)
    torch.manual_seed(0)
    model = CXRVLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, save(model, tokenizer, cfg, root / f"ckpt-{bridger}")
