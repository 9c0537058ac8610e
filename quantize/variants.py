"""Quantized LLM variants of a bundle (`cxrlite quantize`): GGUF types through llama.cpp's
quantizer (cxrlite.quantize.gguf) and GPTQ (cxrlite.quantize.gptq), each added to the bundle
atomically by export.bundle.update_bundle, so a crash leaves the previous bundle valid.

Calibration text (for the importance matrix and GPTQ) is the user's file, else phantom reports
written from sampled labels: clinical wording without images or patient data.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cxrlite.bundle import Key, Kind, Variant, variant_entry
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

Builder = Callable[[Path], dict[str, Any]]
SOURCE_GGUF = ("gguf-f32", "gguf-f16")  # what a variant is quantized from, best first


class QuantizeError(CxrliteError, ValueError):
    """A quantization request that cannot be met: unreadable or empty calibration text, or a
    bundle without an f32/f16 GGUF to quantize from."""


def calibration_texts(path: Path | None, n: int = 128, seed: int = 0) -> list[str]:
    """Clinical calibration text: the user's file (one text a line, or JSONL with `text`), else
    `n` phantom reports written from sampled labels (no images needed)."""
    if path is not None:
        try:
            if path.suffix.lower() == ".jsonl":
                from cxrlite.fileio import read_jsonl

                texts = [str(row.get("text", "")) for row in read_jsonl(path)]
            else:
                texts = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise QuantizeError(
                f"--calibration {path}: not UTF-8 text (one text a line, or JSONL with `text`)"
            ) from None
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise QuantizeError(f"{path}: no calibration text found")
        return texts
    import numpy as np

    from cxrlite.phantoms.generator import sample_labels
    from cxrlite.phantoms.reports import write_report

    rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    return [" ".join(write_report(sample_labels(rng), text_rng)) for _ in range(n)]


def source_gguf(bundle: Any) -> Variant:
    """The bundle's unquantized GGUF variant that quantized types are made from."""
    for name in SOURCE_GGUF:
        if name in bundle.llm_variants:
            return bundle.llm_variants[name]
    raise QuantizeError(f"{bundle.path}: no f32/f16 GGUF to quantize from; re-run `cxrlite export`")


def gguf_variant_builder(bundle: Any, qtype: str, imatrix: dict | None) -> Builder:
    """update_bundle builder of llm/llm-<qtype>.gguf, variant "gguf-<qtype>"."""

    def add(staging: Path) -> dict[str, Any]:
        from cxrlite.quantize.gguf import gguf_tensor_types, quantize_gguf

        source = source_gguf(bundle)
        rel = f"llm/llm-{qtype}.gguf"
        out = quantize_gguf(bundle.file(source.file), staging / rel, qtype, imatrix=imatrix)
        entry = variant_entry(
            rel, Kind.GGUF, qtype, out.stat().st_size,
            **{"from": source.file},
            tensor_types=gguf_tensor_types(out),
            imatrix=imatrix is not None,
        )  # fmt: skip
        return {Key.LLM: {f"gguf-{qtype}": entry}}

    return add


def gptq_variant_builder(
    checkpoint: Path,
    texts: Sequence[str],
    bits: int,
    group_size: int,
    act_order: bool,
    device: Any = None,
) -> Builder:
    """update_bundle builder of the llm/gptq folder, variant "gptq-<bits>bit", quantized on
    `device` (None: cxrlite.device.resolve_device's choice)."""

    def add(staging: Path) -> dict[str, Any]:
        from cxrlite.quantize.gptq import quantize_gptq
        from cxrlite.runtime.gptq import gptq_format_check

        rel = "llm/gptq"
        out = quantize_gptq(
            checkpoint,
            staging / rel,
            list(texts),
            bits=bits,
            group_size=group_size,
            act_order=act_order,
            device=device,
        )
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        entry = variant_entry(
            rel, Kind.GPTQ, f"int{bits}", size,
            group_size=group_size, act_order=act_order, format_check=gptq_format_check(out),
        )  # fmt: skip
        return {Key.LLM: {f"gptq-{bits}bit": entry}}

    return add


def add_variants(
    bundle_dir: Path,
    qtypes: Sequence[str],
    *,
    imatrix: bool = False,
    gptq: bool = False,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    calibration: Path | None = None,
    checkpoint: Path | None = None,
    on_added: Callable[[Any, str], None] | None = None,
) -> tuple[Any, list[str]]:
    """Add a GGUF variant per type in `qtypes` (with an importance matrix from the calibration
    text when `imatrix`), then a GPTQ one when `gptq`; each is in the bundle before the next
    starts, and `on_added(bundle, name)` hears of it. `checkpoint` replaces the manifest's
    source checkpoint (the importance matrix and GPTQ read it). Returns the updated bundle and
    the names added."""
    from cxrlite.bundle import load_bundle
    from cxrlite.export.bundle import update_bundle
    from cxrlite.runtime.plan import reference_checkpoint

    bundle = load_bundle(bundle_dir)
    texts = calibration_texts(calibration)
    ckpt = reference_checkpoint(bundle, checkpoint) if imatrix or gptq else None
    if gptq:  # a GPTQ request that cannot be met fails before any variant is written
        from cxrlite.model.checkpoint import load_config
        from cxrlite.quantize.gptq import check_gptq_shapes

        check_gptq_shapes(load_config(ckpt).llm, bits, group_size)
    matrix = None
    if imatrix:
        from cxrlite.quantize.gguf import compute_imatrix

        matrix = compute_imatrix(ckpt, texts)
    added = []

    def added_variant(updated: Any, name: str) -> None:
        added.append(name)
        if on_added is not None:
            on_added(updated, name)

    for qtype in qtypes:
        bundle = update_bundle(bundle_dir, gguf_variant_builder(bundle, qtype, matrix))
        added_variant(bundle, f"gguf-{qtype}")
    if gptq:
        from cxrlite.device import resolve_device

        device = resolve_device(purpose="quantization").device
        builder = gptq_variant_builder(ckpt, texts, bits, group_size, act_order, device)
        bundle = update_bundle(bundle_dir, builder)
        added_variant(bundle, f"gptq-{bits}bit")
    return bundle, added
