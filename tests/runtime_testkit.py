"""A tiny bundle (ONNX fp32 + fp16 vision, GGUF f32 LLM) for the runtime, quality and report tests,
built once per test session and shared by their modules (conftest's `runtime_built`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from export_testkit import report_corpus

from cxrlite.model.checkpoint import save
from cxrlite.model.config import get_preset
from cxrlite.model.tokenizer import bind_tokenizer, build_tokenizer
from cxrlite.model.vlm import CXRVLM

_BUILT: dict[str, tuple[CXRVLM, Path, Path]] = {}

# A perturbation of 0.2 (not export_testkit's 0.05) so the random model's greedy text varies
# and its top-1/top-2 logit margins stay far above the rounding difference between llama.cpp's
# exact f32 path and PyTorch: greedy ids can then be compared exactly.
WEIGHT_NOISE = 0.2


def runtime_bundle(tmp_path_factory) -> tuple[CXRVLM, Path, Path]:
    """(model, checkpoint dir, bundle dir), built on first use in the session's temp folder."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        from cxrlite.export.bundle import export_bundle
        from cxrlite.export.gguf_builder import gguf_builder

        root = tmp_path_factory.mktemp("runtime-bundle")
        model, tokenizer = noisy_tiny_model(root)
        ckpt = save(model, tokenizer, model.cfg, root / "ckpt")
        bundle = export_bundle(
            ckpt, root / "bundle", fp16=True, extra_builders=[gguf_builder(ckpt, "f32")]
        )
        _BUILT[key] = (model, ckpt, bundle.path)
    return _BUILT[key]


def noisy_tiny_model(root: Path, **overrides: Any) -> tuple[CXRVLM, Any]:
    """(model, tokenizer): the tiny preset with `overrides`, its tokenizer trained on
    report_corpus under root/tok, weights perturbed by WEIGHT_NOISE (seed 0)."""
    cfg = get_preset("tiny", **overrides)
    tokenizer = build_tokenizer(cfg, root / "tok", corpus=report_corpus())
    cfg = bind_tokenizer(cfg, tokenizer)
    torch.manual_seed(0)
    model = CXRVLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * WEIGHT_NOISE)
    return model, tokenizer


def random_pixels(seed: int, channels: int = 1, size: int = 64) -> np.ndarray:
    """Preprocessed-looking pixels [C, S, S] (normalized values around 0)."""
    return np.random.default_rng(seed).standard_normal((channels, size, size)).astype(np.float32)
