"""`cxrlite export`: checkpoint -> deployment bundle (ONNX vision tower + GGUF LLM)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cxrlite.bundle import VARIANT_SECTIONS, Key

# Re-exported: tests/runtime_testkit.py builds its bundle with it from here.
from cxrlite.export.gguf_builder import gguf_builder


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Bundle folder."
)
@click.option(
    "--gguf",
    "gguf_dtype",
    type=click.Choice(["f16", "f32"]),
    default="f16",
    show_default=True,
    help="Precision of the GGUF LLM (quantize it further with `cxrlite quantize`).",
)
@click.option(
    "--fp16/--no-fp16",
    default=True,
    show_default=True,
    help="Also write an fp16 ONNX vision tower.",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write an int8 (dynamic quantization) ONNX vision tower for CPUs.",
)
@click.option(
    "--tensorrt",
    is_flag=True,
    help="Also build a TensorRT engine (needs TensorRT and an NVIDIA GPU).",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 256),
    default=8,
    show_default=True,
    help="Largest image batch of the TensorRT optimization profile.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle at OUT.")
def export(
    checkpoint: Path,
    out: Path,
    gguf_dtype: str,
    fp16: bool,
    int8: bool,
    tensorrt: bool,
    max_batch: int,
    overwrite: bool,
) -> None:
    """Export CHECKPOINT (a `cxrlite train` stage folder's checkpoint/) into a bundle that
    `cxrlite serve` and `cxrlite report` load: the vision tower (encoder + bridger) as one ONNX
    graph checked against PyTorch on held-out phantoms, and the LLM as GGUF checked against
    transformers through llama.cpp. Everything is written in a staging folder and moved into
    place only when complete and verified."""
    from cxrlite.export.bundle import export_bundle

    bundle = export_bundle(
        checkpoint,
        out,
        fp16=fp16,
        int8=int8,
        tensorrt=tensorrt,
        max_batch=max_batch,
        extra_builders=[gguf_builder(checkpoint, gguf_dtype)],
        overwrite=overwrite,
    )
    click.echo(f"bundle {out}")
    echo_variants(bundle)


def echo_variants(bundle: Any) -> None:
    """One line per variant (file, size, parity), then the defaults: what export and import
    print about the bundle they wrote."""
    for section in VARIANT_SECTIONS:
        for name, variant in bundle.variants(section).items():
            size = bundle.variant_bytes(section, name)
            click.echo(
                f"  {section:6s} {name:14s} {variant.file}  {size / 2**20:.2f} MiB"
                f"  parity {_parity_text(variant.parity)}"
            )
    default = bundle.default
    click.echo(f"  default: vision {default[Key.VISION]}, llm {default[Key.LLM]}")


def _parity_text(parity: dict | None) -> str:
    if not parity:
        return "-"
    shown = {
        k: v
        for k, v in parity.items()
        if k.startswith(("max_abs_diff", "max_rel", "mean_cosine", "passed"))
    }
    # cosine to 6 digits: int8's 0.9999 must not print as 1
    return ", ".join(
        f"{k}={v:.6g}"
        if k == "mean_cosine"
        else f"{k}={v:.3g}"
        if isinstance(v, float)
        else f"{k}={v}"
        for k, v in shown.items()
    )
