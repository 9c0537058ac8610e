"""`cxrlite quantize`: add quantized LLM variants (GGUF, GPTQ) to a bundle, each behind a quality gate."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import click

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

    from cxrlite.phantoms.generator import sample_labels
    from cxrlite.phantoms.reports import write_report

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
        from cxrlite.quantize.gptq import quantize_gptq
        from cxrlite.runtime.gptq import gptq_format_check

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
    from cxrlite.bundle import load_bundle
    from cxrlite.export.bundle import update_bundle
    from cxrlite.runtime.plan import reference_checkpoint

    bundle = load_bundle(bundle_dir)
    texts = calibration_texts(calibration)
    matrix = None
    if imatrix:
        from cxrlite.quantize.gguf import compute_imatrix

        matrix = compute_imatrix(reference_checkpoint(bundle, checkpoint), texts)
    added = []
    for qtype in qtypes:
        bundle = update_bundle(bundle_dir, gguf_variant_builder(bundle, qtype, matrix))
        added.append(_echo_variant(bundle, f"gguf-{qtype}"))
    if gptq:
        ckpt = reference_checkpoint(bundle, checkpoint)
        bundle = update_bundle(bundle_dir, gptq_variant_builder(ckpt, texts, int(bits), group_size, act_order))
        added.append(_echo_variant(bundle, f"gptq-{bits}bit"))
    if not added:
        return
    quality = gate_variants(bundle_dir, added, checkpoint, eval_studies, max_f1_drop / 100, force, threads)
    best = _best(bundle, quality)
    bundle = update_bundle(bundle_dir, lambda staging: {"quality": quality, "default": {"llm": best}})
    for name, q in quality.items():
        f1 = "not evaluated" if q.get("findings_f1") is None else f"findings F1 {q['findings_f1']:.3f}"
        if "deployable" not in q:
            click.echo(f"  quality {name:14s} {f1} (fp32 PyTorch reference)")
            continue
        delta = q.get("deltas", {}).get("findings_f1")
        click.echo(f"  quality {name:14s} {f1}" + (f" ({delta * 100:+.1f} points)" if delta is not None else "")
                   + f"  deployable: {q['deployable']}" + (" (forced)" if q.get("forced") else ""))
    click.echo(f"  default llm: {bundle.manifest['default']['llm']}")
# fmt: on


def gate_variants(
    bundle_dir: Path,
    names: list[str],
    checkpoint: Path | None,
    n: int,
    max_drop: float,
    force: bool,
    threads: int | None,
) -> dict[str, dict[str, Any]]:
    """Score the fp32 reference and each variant on the same held-out phantoms; gate each."""
    if n == 0:
        return {name: {"deployable": force, "forced": force, "evaluated": False} for name in names}
    from cxrlite.eval.quality import evaluate_variant, held_out_phantoms, quality_gate
    from cxrlite.runtime import Runtime

    out: dict[str, dict[str, Any]] = {}
    with held_out_phantoms(n) as held:

        def score(**backends: Any) -> dict[str, Any]:
            runtime = Runtime.from_bundle(bundle_dir, threads=threads, warmup=False, **backends)
            try:
                return evaluate_variant(runtime, held.studies, held.mc_records, held.report_texts)
            finally:
                runtime.close()

        reference = score(vision_backend="torch", llm_backend="torch", checkpoint=checkpoint)
        out["reference"] = {
            "reference": "fp32 checkpoint, PyTorch",
            "evaluated": True,
            **_summary(reference),
        }
        for name in names:
            result = score(vision_backend="onnx", llm_variant=name)
            passed, deltas = quality_gate(reference, result, max_f1_drop=max_drop)
            out[name] = {
                "deployable": passed or force,
                "forced": force and not passed,
                "evaluated": True,
                "deltas": deltas,
                **_summary(result),
            }
    return out


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("findings_f1", "mc_accuracy", "perplexity", "n_studies", "n_mc", "wall_s", "variants")
    return {k: result[k] for k in keys if k in result}


def _best(bundle: Any, quality: dict[str, dict[str, Any]]) -> str | None:
    """The smallest deployable GGUF variant (llama.cpp runs everywhere); else the current default."""
    files = bundle.manifest["files"]
    candidates = [
        name
        for name, q in quality.items()
        if q.get("deployable") and bundle.llm_variants.get(name, {}).get("kind") == "gguf"
    ]
    if not candidates:
        return bundle.manifest["default"]["llm"]
    return min(candidates, key=lambda name: files[bundle.llm_variants[name]["file"]]["size"])


def _echo_variant(bundle: Any, name: str) -> str:
    entry = bundle.llm_variants[name]
    files = bundle.manifest["files"]
    size = sum(
        rec["size"]
        for rel, rec in files.items()
        if rel == entry["file"] or rel.startswith(entry["file"] + "/")
    )
    click.echo(f"  llm {name:14s} {entry['file']}  {size / 2**20:.2f} MiB")
    return name
