"""`cxrlite quantize`: add quantized LLM variants (GGUF, GPTQ) to a bundle, each behind a quality gate."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import click

from cxrlite.commands import user_errors

logger = logging.getLogger(__name__)


def _qtypes(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    return [v.strip().lower() for v in (value or "").split(",") if v.strip()]


def calibration_texts(path: Path | None, n: int = 128, seed: int = 0) -> list[str]:
    """Clinical calibration text: the user's file (one text a line, or JSONL with `text`), else
    phantom reports written from sampled labels (no images needed)."""
    if path is not None:
        if path.suffix.lower() == ".jsonl":
            from cxrlite.fileio import read_jsonl

            texts = [str(row.get("text", "")) for row in read_jsonl(path)]
        else:
            texts = path.read_text(encoding="utf-8").splitlines()
        texts = [t for t in texts if t.strip()]
        if not texts:
            raise ValueError(f"{path}: no calibration text found")
        return texts
    import numpy as np

    from cxrlite.data.phantoms import sample_labels
    from cxrlite.data.reports import write_report

    rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    return [" ".join(write_report(sample_labels(rng), text_rng)) for _ in range(n)]


def gguf_variant_builder(bundle: Any, qtype: str, imatrix: dict | None):
    def add(staging: Path) -> dict[str, Any]:
        from cxrlite.quantize.gguf import gguf_tensor_types, quantize_gguf

        source = _source_gguf(bundle)
        rel = f"llm/llm-{qtype}.gguf"
        out = quantize_gguf(bundle.file(source["file"]), staging / rel, qtype, imatrix=imatrix)
        entry = {
            "file": rel,
            "kind": "gguf",
            "dtype": qtype,
            "from": source["file"],
            "tensor_types": gguf_tensor_types(out),
            "imatrix": imatrix is not None,
        }
        return {"llm": {f"gguf-{qtype}": entry}}

    return add


def gptq_variant_builder(
    checkpoint: Path, texts: list[str], bits: int, group_size: int, act_order: bool
):
    def add(staging: Path) -> dict[str, Any]:
        from cxrlite.quantize.gptq import gptq_format_check, quantize_gptq

        rel = "llm/gptq"
        out = quantize_gptq(
            checkpoint, staging / rel, texts, bits=bits, group_size=group_size, act_order=act_order
        )
        entry = {
            "file": rel,
            "kind": "gptq",
            "dtype": f"int{bits}",
            "group_size": group_size,
            "act_order": act_order,
            "format_check": gptq_format_check(out),
        }
        return {"llm": {f"gptq-{bits}bit": entry}}

    return add


def _source_gguf(bundle: Any) -> dict[str, Any]:
    for name in ("gguf-f32", "gguf-f16"):
        if name in bundle.llm_variants:
            return bundle.llm_variants[name]
    raise ValueError(f"{bundle.path}: no f32/f16 GGUF to quantize from; re-run `cxrlite export`")


def source_checkpoint(bundle: Any, override: Path | None) -> Path:
    """The checkpoint the bundle was exported from, verified against the manifest's hash."""
    from cxrlite.export.bundle import sha256_file

    source = bundle.manifest.get("source", {})
    path = override or Path(source.get("path", ""))
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{path}: the source checkpoint is needed (GPTQ, quality gate); pass --checkpoint"
        )
    if source.get("weights_sha256") and sha256_file(weights) != source["weights_sha256"]:
        raise ValueError(
            f"{weights} is not the checkpoint this bundle was exported from (sha256 differs)"
        )
    return path


@click.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--gguf",
    "qtypes",
    callback=_qtypes,
    default="q8_0,q4_k_m",
    show_default=True,
    help="llama.cpp quantization types, comma-separated (any llama.cpp type; '' for none).",
)
@click.option(
    "--imatrix", is_flag=True, help="Compute an importance matrix on the calibration text first."
)
@click.option(
    "--gptq",
    is_flag=True,
    help="Also write a GPTQ checkpoint (GPTQModel; standard qweight/qzeros format).",
)
@click.option(
    "--bits",
    type=click.Choice(["2", "3", "4", "8"]),
    default="4",
    show_default=True,
    help="GPTQ bits.",
)
@click.option(
    "--group-size", type=int, default=128, show_default=True, help="GPTQ group size (-1: per row)."
)
@click.option("--act-order", is_flag=True, help="GPTQ activation order (desc_act).")
@click.option(
    "--calibration",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Calibration text (one per line, or JSONL with `text`); default: phantom reports.",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Source checkpoint, if it moved since export (its hash must match the manifest).",
)
@user_errors
def quantize(
    bundle_dir: Path,
    qtypes: list[str],
    imatrix: bool,
    gptq: bool,
    bits: str,
    group_size: int,
    act_order: bool,
    calibration: Path | None,
    checkpoint: Path | None,
) -> None:
    """Add quantized LLM variants to BUNDLE_DIR: GGUF through llama.cpp's quantizer, and
    optionally GPTQ. Each variant is added atomically (a crash leaves the previous bundle valid)."""
    from cxrlite.export.bundle import load_bundle, update_bundle

    bundle = load_bundle(bundle_dir)
    texts = calibration_texts(calibration)
    matrix = None
    if imatrix:
        from cxrlite.quantize.gguf import compute_imatrix

        matrix = compute_imatrix(source_checkpoint(bundle, checkpoint), texts)
    for qtype in qtypes:
        bundle = update_bundle(bundle_dir, gguf_variant_builder(bundle, qtype, matrix))
        _echo_variant(bundle, f"gguf-{qtype}")
    if gptq:
        ckpt = source_checkpoint(bundle, checkpoint)
        bundle = update_bundle(
            bundle_dir, gptq_variant_builder(ckpt, texts, int(bits), group_size, act_order)
        )
        _echo_variant(bundle, f"gptq-{bits}bit")


def _echo_variant(bundle: Any, name: str) -> None:
    entry = bundle.llm_variants[name]
    files = bundle.manifest["files"]
    size = sum(
        rec["size"]
        for rel, rec in files.items()
        if rel == entry["file"] or rel.startswith(entry["file"] + "/")
    )
    click.echo(f"  llm {name:14s} {entry['file']}  {size / 2**20:.2f} MiB")
