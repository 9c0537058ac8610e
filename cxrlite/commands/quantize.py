"""`cxrlite quantize`: add quantized LLM variants (GGUF, GPTQ) to a bundle, each behind a quality
gate (cxrlite.quantize.variants adds them, cxrlite.quantize.gate scores them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cxrlite.bundle import Key


def _qtypes(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str]:
    return [v.strip().lower() for v in (value or "").split(",") if v.strip()]


def _echo_variant(bundle: Any, name: str) -> None:
    size = bundle.variant_bytes(Key.LLM, name)
    click.echo(f"  llm {name:14s} {bundle.llm_variants[name].file}  {size / 2**20:.2f} MiB")


# fmt: off
@click.command()
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gguf", "qtypes", callback=_qtypes, default="q8_0,q4_k_m", show_default=True,
              help="llama.cpp quantization types, comma-separated (any llama.cpp type; '' for none).")
@click.option("--imatrix", is_flag=True, help="Compute an importance matrix on the calibration text first.")
@click.option("--gptq", is_flag=True, help="Also write a GPTQ checkpoint (GPTQModel; standard qweight/qzeros format).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True, help="GPTQ bits.")
@click.option("--group-size", type=int, default=128, show_default=True, help="GPTQ group size (-1: per row).")
@click.option("--act-order", is_flag=True, help="GPTQ activation order (desc_act).")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration text (one per line, or JSONL with `text`); default: phantom reports.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Source checkpoint, if it moved since export (its hash must match the manifest).")
@click.option("--eval-studies", type=click.IntRange(0), default=48, show_default=True,
              help="Held-out phantoms for the quality gate (0: skip it; variants are then not deployable).")
@click.option("--max-f1-drop", type=click.FloatRange(0, 100), default=2.0, show_default=True,
              help="Largest findings-F1 drop, in points, against the fp32 checkpoint for a deployable variant.")
@click.option("--force", is_flag=True, help="Mark variants deployable even when they fail the quality gate.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for the evaluation.")
def quantize(bundle_dir: Path, qtypes: list[str], imatrix: bool, gptq: bool, bits: str, group_size: int,
             act_order: bool, calibration: Path | None, checkpoint: Path | None, eval_studies: int,
             max_f1_drop: float, force: bool, threads: int | None) -> None:
    """Add quantized LLM variants to BUNDLE_DIR: GGUF through llama.cpp's quantizer, and
    optionally GPTQ. Each variant is added atomically (a crash leaves the previous bundle valid).

    Quality gate: the fp32 checkpoint and each variant are scored on the same held-out phantoms
    (findings F1 through the report labeler, multiple-choice accuracy, perplexity on reports); the
    results go into the manifest, and a variant that loses more than --max-f1-drop points of F1 is
    not deployable (never made the default) unless --force."""
    from cxrlite.quantize.gate import gate_and_record
    from cxrlite.quantize.variants import add_variants

    bundle, added = add_variants(bundle_dir, qtypes, imatrix=imatrix, gptq=gptq, bits=int(bits),
                                 group_size=group_size, act_order=act_order, calibration=calibration,
                                 checkpoint=checkpoint, on_added=_echo_variant)
    if not added:
        return
    bundle, quality = gate_and_record(bundle_dir, bundle, added, checkpoint=checkpoint, n=eval_studies,
                                      max_drop=max_f1_drop / 100, force=force, threads=threads)
    for name, q in quality.items():
        f1 = "not evaluated" if q.get("findings_f1") is None else f"findings F1 {q['findings_f1']:.3f}"
        if "deployable" not in q:
            click.echo(f"  quality {name:14s} {f1} (fp32 PyTorch reference)")
            continue
        delta = q.get("deltas", {}).get("findings_f1")
        click.echo(f"  quality {name:14s} {f1}" + (f" ({delta * 100:+.1f} points)" if delta is not None else "")
                   + f"  deployable: {q['deployable']}" + (" (forced)" if q.get("forced") else ""))
    click.echo(f"  default llm: {bundle.default[Key.LLM]}")
# fmt: on
