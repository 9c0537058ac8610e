"""Random-weight bundles of real model shapes, for latency benchmarks without downloads.

    cxrlite bench --shape 1b --llm-variants gguf-f16,gguf-q4_k_m      # vitb16-llama1b
    cxrlite bench --shape 7b --llm-variants gguf-q4_k_m               # so400m-llama7b
    cxrlite bench --shape llava-rad --llm-variants gguf-q4_k_m        # dinov2b14-vicuna7b
    cxrlite bench --shape medgemma --llm-variants gguf-q4_k_m         # siglip896-gemma3-4b
    build_shape_bundle("1b", llm_variants=["gguf-q4_k_m"])           # -> the cached bundle path

The LLM is never built in memory: its GGUF (f16) is written tensor by tensor from random normal
values (std 0.02, the usual Llama init; norm weights 1), one tensor in memory at a time, through the
exporter's own `plan_tensors` / `write_gguf_tensors`, then quantized with llama.cpp's quantizer
(`quantize_gguf`): writing a 7B f16 GGUF takes its full size on disk but only its largest tensor in
memory. The vision tower (a ViT-B or SO400M with the bridger: 0.1-0.4 B parameters) is built in
torch with transformers' random init and exported to ONNX as `cxrlite export` does. The tokenizer is
our SentencePiece trainer on phantom reports (at most 1024 pieces: a 128k-piece vocabulary cannot be
learnt from them); the GGUF vocabulary is padded to the preset's size with unused tokens, so the
embedding and output matrices have their real shapes and cost.

The "checkpoint" beside the bundle holds the vision tower's weights only, so the PyTorch vision
reference runs (`--vision-backends torch`) and the PyTorch LLM reference is reported as unavailable.
Everything lives under `cache_dir/<shape key>/`; a second run reuses it and only adds variants it
lacks. `scale`, `layers` and `vision_layers` shrink a shape (tests run the same code path tiny).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlite.bundle import Key, Kind, variant_entry
from cxrlite.errors import CxrliteError
from cxrlite.model.config import SHAPES, ModelConfig, get_preset

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/cxrlite/shapes")
WEIGHT_STD = 0.02
TOKENIZER_PIECES = 1024
CARDS_GB = (8, 16, 24)
# What a GPU process holds besides weights, KV cache and buffers (CUDA context, cuBLAS
# workspace, allocator slack): an allowance, so a model that fits only without it is not
# reported as fitting.
CUDA_OVERHEAD_BYTES = 600 * 2**20


class ShapeError(CxrliteError, ValueError):
    """A shape cannot be built as asked (unknown preset, bad override, unsupported variant)."""


# --- configuration ---------------------------------------------------------------------------


def _scaled_heads(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def shape_config(
    shape: str,
    *,
    scale: float = 1.0,
    layers: int | None = None,
    vision_layers: int | None = None,
    vocab_size: int | None = None,
) -> ModelConfig:
    """The preset of `shape` ("1b", "7b" or a preset name), optionally shrunk: `scale` multiplies
    head counts (widths follow at the same head size) and FFN widths; `layers`/`vision_layers`
    replace the depths; `vocab_size` the LLM vocabulary."""
    preset = SHAPES.get(shape, shape)
    if not 0 < scale <= 1:
        raise ShapeError(f"scale must be in (0, 1], got {scale}")
    try:
        cfg = get_preset(preset)
    except ValueError as e:
        raise ShapeError(f"{e}; shapes: {sorted(SHAPES)}") from None
    v, b, m = cfg.vision, cfg.bridger, cfg.llm
    v_heads = _scaled_heads(v.num_heads, scale)
    heads = _scaled_heads(m.num_heads, scale)
    kv = _scaled_heads(m.num_kv_heads, scale)
    while heads % kv:
        kv -= 1  # grouped-query attention needs kv heads dividing heads
    depth = vision_layers or v.num_layers
    vision = dataclasses.replace(
        v,
        num_heads=v_heads,
        hidden_size=v_heads * (v.hidden_size // v.num_heads),
        intermediate_size=(
            v_heads * (v.hidden_size // v.num_heads) * (v.intermediate_size // v.hidden_size)
            if v.kind == "dinov2"  # DINOv2's MLP is a whole multiple of its width
            else max(32, round(v.intermediate_size * scale / 32) * 32)
        ),
        num_layers=depth,
        # LLaVA's penultimate layer, unless a shrunk tower has no penultimate layer
        feature_layer=v.feature_layer if -depth <= v.feature_layer else -1,
    )
    llm = dataclasses.replace(
        m,
        num_heads=heads,
        num_kv_heads=kv,
        # a model with its own head size (Gemma 3) scales its width like its FFN
        hidden_size=(
            heads * m.head_size
            if m.head_dim is None
            else max(32, round(m.hidden_size * scale / 32) * 32)
        ),
        intermediate_size=max(32, round(m.intermediate_size * scale / 32) * 32),
        num_layers=layers or m.num_layers,
        vocab_size=vocab_size or m.vocab_size,
        bos_token_id=1,
        eos_token_id=2,
    )
    return cfg.replace(vision=vision, bridger=b, llm=llm)


# Bumped when what a shape bundle holds changes, so an older cached build is not reused.
SHAPE_FORMAT = 2


def shape_key(cfg: ModelConfig, shape: str) -> str:
    data = {**cfg.to_dict(), "shape_format": SHAPE_FORMAT}
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return f"{SHAPES.get(shape, shape)}-{digest[:10]}"


# --- the LLM as a GGUF, tensor by tensor -----------------------------------------------------


def hf_llm_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the family's HF causal-LM state dict, from a model on the meta device
    (no memory), so they are exactly what a real checkpoint holds."""
    from cxrlite.model.language import build_llm

    with torch.device("meta"):
        model = build_llm(cfg.llm, load_pretrained=False)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if cfg.llm.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Norm weights (1-D) are ones, as initialised; matrices N(0, 0.02) in f16, seeded per name."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.float32)
    generator = torch.Generator().manual_seed(
        seed + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    )
    return torch.randn(shape, generator=generator, dtype=torch.float16).mul_(WEIGHT_STD)


def predicted_gguf_bytes(cfg: ModelConfig) -> int:
    """Tensor bytes of the f16 GGUF: matrices in f16, 1-D tensors in f32."""
    return sum(math.prod(s) * (2 if len(s) >= 2 else 4) for s in hf_llm_shapes(cfg).values())


def write_random_gguf(cfg: ModelConfig, tokenizer_dir: Path, out_path: Path, seed: int = 0) -> Path:
    """A random-weight f16 GGUF (the family's architecture) of `cfg.llm`'s exact shape, streamed
    tensor by tensor. The output rows of the padding past the tokenizer are zero, so the random
    model writes the tokenizer's tokens (text both servers stream), not unused ids: the maximum
    of a thousand random logits is far above zero."""
    from cxrlite.export.gguf import plan_tensors, read_vocab, write_gguf_tensors

    shapes = hf_llm_shapes(cfg)
    vocab = read_vocab(tokenizer_dir, cfg.llm.vocab_size)
    real = sum(1 for t in vocab.tokens if not t.startswith("[PAD"))
    output = "lm_head.weight" if "lm_head.weight" in shapes else "model.embed_tokens.weight"

    def read(name: str) -> torch.Tensor:
        tensor = random_tensor(name, shapes[name], seed)
        if name == output:
            tensor[real:] = 0
        return tensor

    plan = plan_tensors(cfg.llm, shapes, read)
    return write_gguf_tensors(cfg.llm, plan, vocab, out_path, "f16", name="cxrlite-random")


# --- the checkpoint (vision tower + tokenizer) -----------------------------------------------


def _phantom_reports(n: int, seed: int = 0) -> list[str]:
    from cxrlite.phantoms.generator import sample_labels
    from cxrlite.phantoms.reports import write_report

    rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    return [" ".join(write_report(sample_labels(rng), text_rng)) for _ in range(n)]


def build_checkpoint(cfg: ModelConfig, out_dir: Path, seed: int = 0) -> tuple[Path, ModelConfig]:
    """A checkpoint folder with the config, a phantom-report tokenizer and random vision-tower
    weights (no LLM weights). Returns it and the config bound to the tokenizer."""
    from safetensors.torch import save_file

    from cxrlite.fileio import atomic_dir, write_json
    from cxrlite.model.checkpoint import (
        CHECKPOINT_FORMAT,
        CONFIG_FILE,
        FORMAT_VERSION,
        WEIGHTS_FILE,
    )
    from cxrlite.model.tokenizer import bind_tokenizer, train_tokenizer
    from cxrlite.model.vlm import VisionTower

    with atomic_dir(out_dir, lambda p: (p / CONFIG_FILE).is_file()) as tmp:
        pieces = min(cfg.llm.vocab_size, TOKENIZER_PIECES)
        small = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=pieces))
        tokenizer = train_tokenizer(_phantom_reports(600, seed), small, tmp)
        cfg = bind_tokenizer(cfg, tokenizer)
        torch.manual_seed(seed)
        tower = VisionTower(cfg).float().eval()
        state = {k: v.detach().contiguous() for k, v in tower.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(
            tmp / CONFIG_FILE,
            {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict()},
        )
    return out_dir, cfg


# --- bundle builders -------------------------------------------------------------------------


def _vision_builder(ckpt: Path, names: Sequence[str]):
    def build(staging: Path) -> dict[str, Any]:
        from cxrlite.export import onnx as ox
        from cxrlite.model.checkpoint import load_vision_tower

        folder = staging / "vision"
        tower = load_vision_tower(ckpt)
        fp32 = ox.export_vision_onnx(tower, folder / "vision-fp32.onnx")
        del tower
        made = {"onnx-fp32": fp32}
        if "onnx-fp16" in names:
            made["onnx-fp16"] = ox.convert_onnx_fp16(fp32, folder / "vision-fp16.onnx")
        if "onnx-int8" in names:
            made["onnx-int8"] = ox.quantize_onnx_int8(fp32, folder / "vision-int8.onnx")
        variants = {
            name: variant_entry(
                path.relative_to(staging).as_posix(),
                Kind.ONNX,
                ox.onnx_precision(path),
                path.stat().st_size,
                parity=None,
                random_weights=True,
            )
            for name, path in made.items()
            if name in names or name == "onnx-fp32"
        }
        return {Key.VISION: variants, Key.DEFAULT: {Key.VISION: "onnx-fp32"}}

    return build


def _f16_builder(cfg: ModelConfig, ckpt: Path, seed: int):
    def build(staging: Path) -> dict[str, Any]:
        rel = "llm/llm-f16.gguf"
        path = write_random_gguf(cfg, ckpt, staging / rel, seed)
        entry = variant_entry(rel, Kind.GGUF, "f16", path.stat().st_size, random_weights=True)
        return {Key.LLM: {"gguf-f16": entry}, Key.DEFAULT: {Key.LLM: "gguf-f16"}}

    return build


def _quant_builder(source: Path | None, qtype: str):
    def build(staging: Path) -> dict[str, Any]:
        from cxrlite.quantize.gguf import gguf_tensor_types, quantize_gguf

        src = source if source is not None else staging / "llm/llm-f16.gguf"
        rel = f"llm/llm-{qtype}.gguf"
        out = quantize_gguf(src, staging / rel, qtype)
        entry = variant_entry(
            rel, Kind.GGUF, qtype, out.stat().st_size,
            **{"from": "llm/llm-f16.gguf"},
            tensor_types=gguf_tensor_types(out),
            random_weights=True,
        )  # fmt: skip
        return {Key.LLM: {f"gguf-{qtype}": entry}, Key.DEFAULT: {Key.LLM: f"gguf-{qtype}"}}

    return build


def build_shape_bundle(
    shape: str = "1b",
    *,
    llm_variants: Sequence[str] = ("gguf-f16", "gguf-q8_0", "gguf-q4_k_m"),
    vision_variants: Sequence[str] = ("onnx-fp32", "onnx-fp16"),
    cache_dir: str | os.PathLike | None = None,
    scale: float = 1.0,
    layers: int | None = None,
    vision_layers: int | None = None,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """The cached random-weight bundle of `shape` holding at least the requested variants
    (GGUF "gguf-<llama.cpp type>", ONNX "onnx-fp32/fp16/int8"); builds what is missing."""
    from cxrlite.bundle import load_bundle
    from cxrlite.export.bundle import create_bundle, update_bundle

    bad = [v for v in llm_variants if not v.startswith("gguf-")]
    bad += [v for v in vision_variants if v not in ("onnx-fp32", "onnx-fp16", "onnx-int8")]
    if bad:
        raise ShapeError(f"random-weight shapes build GGUF and ONNX variants only, not {bad}")
    cfg = shape_config(
        shape, scale=scale, layers=layers, vision_layers=vision_layers, vocab_size=vocab_size
    )
    root = Path(cache_dir or DEFAULT_CACHE).expanduser() / shape_key(cfg, shape)
    ckpt, bundle_dir = root / "checkpoint", root / "bundle"
    if not (ckpt / "config.json").is_file():
        logger.info("building the %s checkpoint (vision tower, tokenizer) in %s", shape, ckpt)
        build_checkpoint(cfg, ckpt, seed)
    from cxrlite.model.checkpoint import load_config

    cfg = load_config(ckpt)
    qtypes = [v.removeprefix("gguf-") for v in llm_variants if v != "gguf-f16"]
    if not (bundle_dir / "manifest.json").is_file():
        builders = [_vision_builder(ckpt, vision_variants), _f16_builder(cfg, ckpt, seed)]
        builders += [_quant_builder(None, q) for q in qtypes]
        create_bundle(ckpt, bundle_dir, builders, overwrite=True)
        return bundle_dir
    bundle = load_bundle(bundle_dir, verify="size")
    missing_vision = [v for v in vision_variants if v not in bundle.vision_variants]
    if missing_vision:
        names = sorted({*bundle.vision_variants, *missing_vision})
        bundle = update_bundle(bundle_dir, _vision_builder(ckpt, names), verify="size")
    for qtype in qtypes:
        if f"gguf-{qtype}" not in bundle.llm_variants:
            source = bundle.variant_file(Key.LLM, "gguf-f16")
            bundle = update_bundle(bundle_dir, _quant_builder(source, qtype), verify="size")
    return bundle_dir


# --- will it fit? ----------------------------------------------------------------------------


def fit_check(
    cfg: ModelConfig,
    llm_bytes: int,
    vision_bytes: int,
    n_ctx: int,
    *,
    kv_bytes: int = 2,
    n_batch: int = 512,
    cards_gb: Sequence[int] = CARDS_GB,
    measured_bytes: int | None = None,
) -> dict[str, Any]:
    """Predicted GPU memory of serving one sequence of `n_ctx` positions: LLM weights (the
    variant's file size) + KV cache + vision tower + llama.cpp compute buffers (logits and
    activations of one `n_batch` micro-batch, f32) + CUDA overhead; and whether it fits cards of
    `cards_gb` GiB (`measured_bytes`, a measured peak, is judged too when given)."""
    m = cfg.llm
    parts = {
        "llm_weights": int(llm_bytes),
        "kv_cache": 2 * m.num_layers * m.num_kv_heads * m.head_size * n_ctx * kv_bytes,
        "vision": int(vision_bytes),
        "compute_buffers": n_batch
        * (m.vocab_size + 2 * m.intermediate_size + 4 * m.hidden_size)
        * 4,
        "cuda_overhead": CUDA_OVERHEAD_BYTES,
    }
    total = sum(parts.values())
    cards = {}
    for card in cards_gb:
        capacity = card * 2**30
        cards[f"{card}GB"] = {
            "fits": total <= capacity,
            "headroom_gb": round((capacity - total) / 2**30, 2),
            **({"fits_measured": measured_bytes <= capacity} if measured_bytes is not None else {}),
        }
    return {
        "n_ctx": n_ctx,
        "parts_gb": {k: round(v / 2**30, 3) for k, v in parts.items()},
        "predicted_gb": round(total / 2**30, 2),
        "measured_gb": None if measured_bytes is None else round(measured_bytes / 2**30, 2),
        "cards": cards,
    }
