"""Tiny checkpoints for the export, bundle and LLaVA tests (conftest's `tiny_checkpoint` builds
one per bridger per session; a test that needs other settings calls `make_checkpoint`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

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


def make_checkpoint(
    root: Path, bridger: str | dict = "mlp", *, tokenizer: Any = None, **overrides: Any
) -> tuple[CXRVLM, Path]:
    """A tiny checkpoint whose weights are perturbed away from their init (a trained model's
    scale), saved under root/ckpt-<bridger kind>. `bridger` is a kind or the bridger's fields;
    `overrides` go to the tiny preset; without a `tokenizer`, one is trained on `report_corpus`
    under root/tok-<bridger kind>."""
    fields = {"kind": bridger} if isinstance(bridger, str) else dict(bridger)
    bridger = fields.get("kind", "mlp")
    cfg = get_preset("tiny", bridger=fields, **overrides)
    if tokenizer is None:
        tokenizer = build_tokenizer(cfg, root / f"tok-{bridger}", corpus=report_corpus())
    cfg = bind_tokenizer(cfg, tokenizer)
    torch.manual_seed(0)
    model = CXRVLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model, save(model, tokenizer, cfg, root / f"ckpt-{bridger}")
