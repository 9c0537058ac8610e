"""The quality gate of `cxrlite quantize`: the fp32 PyTorch reference and each new variant are
scored on the same held-out phantoms (cxrlite.eval.quality), a variant that loses more findings
F1 than allowed is not deployable (unless forced), and the bundle records the scores and makes
the smallest deployable GGUF variant its default LLM.

GGUF is preferred as the default because llama.cpp runs on every machine; GPTQ needs its kernels.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from cxrlite.bundle import Key, Kind

logger = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "findings_f1",
    "mc_accuracy",
    "perplexity",
    "n_studies",
    "n_mc",
    "wall_s",
    "variants",
)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in SUMMARY_KEYS if k in result}


def gate_variants(
    bundle_dir: Path,
    names: list[str],
    checkpoint: Path | None,
    n: int,
    max_drop: float,
    force: bool,
    threads: int | None,
) -> dict[str, dict[str, Any]]:
    """{"reference": its scores, name: scores, deltas and whether deployable} for the variants
    `names` of the bundle, on `n` held-out phantoms (0: none is evaluated, and each is deployable
    only when `force`). `max_drop` is the largest findings-F1 drop (a fraction) that passes."""
    if n == 0:
        return {name: {"deployable": force, "forced": force, "evaluated": False} for name in names}
    from cxrlite.device import resolve_device
    from cxrlite.eval.quality import evaluate_variant, held_out_phantoms, quality_gate
    from cxrlite.runtime import Runtime

    device = str(resolve_device(purpose="evaluation").device)
    out: dict[str, dict[str, Any]] = {}
    with held_out_phantoms(n) as held:

        def score(**backends: Any) -> dict[str, Any]:
            runtime = Runtime.from_bundle(
                bundle_dir, threads=threads, warmup=False, device=device, slots=None, **backends
            )
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


def best_default(bundle: Any, quality: dict[str, dict[str, Any]]) -> str | None:
    """The smallest deployable GGUF variant; else the bundle's current default LLM."""
    ggufs = {name for name, v in bundle.llm_variants.items() if v.kind == Kind.GGUF}
    candidates = [name for name, q in quality.items() if q.get("deployable") and name in ggufs]
    if not candidates:
        return bundle.default[Key.LLM]
    return min(candidates, key=lambda name: bundle.variant_bytes(Key.LLM, name))


def gate_and_record(
    bundle_dir: Path,
    bundle: Any,
    names: list[str],
    *,
    checkpoint: Path | None,
    n: int,
    max_drop: float,
    force: bool,
    threads: int | None,
) -> tuple[Any, dict[str, dict[str, Any]]]:
    """gate_variants, then the manifest's "quality" and default LLM (best_default) written into
    the bundle. Returns the updated bundle and the quality records."""
    from cxrlite.export.bundle import update_bundle

    quality = gate_variants(bundle_dir, names, checkpoint, n, max_drop, force, threads)
    best = best_default(bundle, quality)
    bundle = update_bundle(
        bundle_dir, lambda staging: {Key.QUALITY: quality, Key.DEFAULT: {Key.LLM: best}}
    )
    return bundle, quality
