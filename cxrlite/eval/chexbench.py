"""CheXbench-style evaluation of a checkpoint or of each variant of a bundle (`cxrlite eval`).

Multiple choice (view, binary disease, single / multi disease identification, location and
severity VQA, hard-negative image-text reasoning) is scored by option log-likelihood; findings
generation by the report labeler (14-observation and 5-core-finding micro/macro F1), ROUGE-L and
BLEU; perplexity on the reference reports; fairness as findings F1 by sex and age band. Every
figure has a seeded bootstrap 95% interval (cxrlite.eval.metrics). Runs go through
cxrlite.runtime, so a checkpoint (torch backends) and a bundle's variants are scored by the same
code, the one the quantization quality gate uses (cxrlite.eval.quality.run_variant); this module
adds the intervals. cxrlite.eval.results turns the results into tables and files.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

MC_TASKS = (
    "view_classification",
    "binary_disease_classification",
    "single_disease_identification",
    "multi_disease_identification",
    "location_vqa",
    "severity_vqa",
    "image_text_reasoning",
)
REFERENCE = "torch-fp32"

RuntimeFactory = Callable[[], Any]


class EvalError(CxrliteError, ValueError):
    """Nothing to evaluate: a target that is neither checkpoint nor bundle, unknown variants,
    no test studies, or no variant that could run."""


# --- data and targets ------------------------------------------------------------------------


def load_eval_data(data_dir: Path, n: int | None, seed: int) -> tuple[list[Any], list[Any]]:
    """The test split of a dataset folder (any layout cxrlite.data reads), its first `n` studies,
    and their multiple-choice task records."""
    from cxrlite.data.datasets import load_dataset
    from cxrlite.data.tasks import build_tasks

    studies = [s for s in load_dataset("auto", data_dir) if s.split == "test"]
    if not studies:
        raise EvalError(f"{data_dir}: no studies in the test split")
    studies = studies[:n] if n else studies
    records = [r for r in build_tasks(studies, seed=seed, tasks=MC_TASKS) if r.options]
    return studies, records


def checkpoint_runtime(ckpt: Path, threads: int | None = None, device: Any = None) -> Any:
    """A Runtime over a checkpoint's own PyTorch model (torch vision + torch LLM backends) on
    `device` (None: cxrlite.device.resolve_device's choice)."""
    import torch

    from cxrlite.device import resolve_device
    from cxrlite.imaging.preprocess import PreprocessConfig
    from cxrlite.model.checkpoint import load
    from cxrlite.runtime import Runtime, TorchLLMBackend, TorchVision

    if threads:
        torch.set_num_threads(threads)
    if device is None:
        device = resolve_device(purpose="evaluation").device
    model, tokenizer, cfg = load(ckpt, device=device)
    # Runtime reads only config, preprocess and path from its bundle argument.
    source = SimpleNamespace(
        config=cfg, preprocess=PreprocessConfig.from_dict(cfg.preprocess), path=ckpt
    )
    llm = TorchLLMBackend(model.llm, REFERENCE, n_ctx=min(cfg.llm.max_position_embeddings, 4096))
    vision = TorchVision(model, REFERENCE, str(device))
    return Runtime(source, vision, llm, tokenizer, findings_head=findings_reader(model))


def findings_reader(model: Any) -> Any:
    """The runtime's form of a PyTorch model's findings head (None without one)."""
    from cxrlite.model.findings import FindingsReader

    head = model.findings_head
    if head is None:
        return None
    weight, bias = (
        t.detach().float().cpu().numpy() for t in (head.linear.weight, head.linear.bias)
    )
    return FindingsReader(weight, bias, model.cfg.findings_head)


def is_checkpoint(target: Path) -> bool:
    return (target / "config.json").is_file() and not (target / "manifest.json").is_file()


def eval_targets(
    target: Path, variants: str, threads: int | None, device: Any = None
) -> list[tuple[str, RuntimeFactory]]:
    """[(name, zero-argument runtime factory)] for a checkpoint or a bundle's variants: each LLM
    variant on the default vision variant, each other vision variant on the default LLM, and the
    PyTorch reference when the bundle's source checkpoint is present. PyTorch backends run on
    `device`."""
    if is_checkpoint(target):
        from cxrlite.model.checkpoint import load_config

        load_config(target)  # a broken config fails here, before the data is read
        return [(REFERENCE, lambda: checkpoint_runtime(target, threads, device))]
    if not (target / "manifest.json").is_file():
        raise EvalError(
            f"{target}: neither a checkpoint (config.json) nor a bundle (manifest.json; an "
            "interrupted export leaves none)"
        )
    from cxrlite.bundle import load_bundle
    from cxrlite.runtime import BackendError, Runtime
    from cxrlite.runtime.plan import reference_checkpoint

    bundle = load_bundle(target)
    wanted = None if variants == "all" else {v.strip() for v in variants.split(",") if v.strip()}
    known = {REFERENCE, *bundle.llm_variants, *bundle.vision_variants}
    if wanted and wanted - known:
        raise EvalError(
            f"--variants: unknown variants {sorted(wanted - known)}; the bundle has {sorted(known)}"
        )
    torch_device = None if device is None else str(device)

    def runtime(**kw: Any) -> RuntimeFactory:
        return lambda: Runtime.from_bundle(
            target, threads=threads, warmup=False, verify=False, device=torch_device,
            slots=None, **kw,
        )  # fmt: skip

    out = []
    try:
        reference_checkpoint(bundle)
        if wanted is None or REFERENCE in wanted:
            out.append((REFERENCE, runtime(vision_backend="torch", llm_backend="torch")))
    except BackendError as e:
        logger.warning("no PyTorch reference: %s", e)
    for name in bundle.llm_variants:
        if wanted is None or name in wanted:
            out.append((name, runtime(llm_variant=name)))
    for name in bundle.vision_variants:
        if name != bundle.default.get("vision") and (wanted is None or name in wanted):
            out.append((name, runtime(vision_variant=name)))
    if not out:
        raise EvalError(f"{target}: nothing to evaluate (variants {variants!r})")
    return out


# --- scoring ---------------------------------------------------------------------------------


def evaluate_runtime(
    runtime: Any, studies: list[Any], records: list[Any], *, max_tokens: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """Every metric of one runtime on the studies and MC records, with bootstrap intervals."""
    from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, CORE_FINDINGS
    from cxrlite.data.tasks import study_chexpert
    from cxrlite.eval.labeler import label_report
    from cxrlite.eval.metrics import (
        f1_cis,
        fairness_breakdown,
        group_of,
        mean_ci,
        resample_indices,
        text_metric_cis,
    )
    from cxrlite.eval.quality import run_variant

    texts = [s.narrative for s in studies if s.narrative]
    out = run_variant(runtime, studies, records, texts, max_tokens=max_tokens)
    generated, hits = out.generated, out.hits
    pred = [label_report(text) for text in generated]
    truth = [study_chexpert(s) for s in studies]
    paired = {"indices": resample_indices(len(studies), n_boot, seed)}
    findings = {
        "core5": f1_cis(pred, truth, CORE_FINDINGS, **paired),
        "chexpert14": f1_cis(pred, truth, CHEXPERT_OBSERVATIONS, **paired),
    }
    text = text_metric_cis(generated, [s.findings or "" for s in studies], **paired)
    all_hits = [h for task in MC_TASKS for h in hits.get(task, [])]
    mc = {
        "all": {"n": len(all_hits), **mean_ci(all_hits, n_boot=n_boot, seed=seed)},
        **{t: {"n": len(h), **mean_ci(h, n_boot=n_boot, seed=seed)} for t, h in hits.items()},
    }
    fairness = {
        by: fairness_breakdown(
            pred, truth, [group_of(s, by) for s in studies], CORE_FINDINGS, n_boot=n_boot, seed=seed
        )
        for by in ("sex", "age")
    }
    return {
        "variants": dict(runtime.variants),
        "n_studies": len(studies),
        "n_mc": len(all_hits),
        "findings": findings,
        "text": text,
        "mc": mc,
        "fairness": fairness,
        "perplexity": out.perplexity["perplexity"],
        "wall_s": round(out.wall_s, 2),
        "generated": generated,
    }


def add_agreement(results: dict[str, dict[str, Any]]) -> None:
    """Per variant, the share of studies whose generated findings are the same text as the first
    result's (the PyTorch reference when it ran): greedy decoding makes any difference a change
    of the model's output, not of sampling."""
    reference = next(iter(results.values()))["generated"]
    for r in results.values():
        same = [int(a == b) for a, b in zip(r["generated"], reference, strict=True)]
        r["same_text_as_reference"] = sum(same) / len(same) if same else math.nan


# --- one evaluation ----------------------------------------------------------------------------


def run_eval(
    target: Path,
    data_dir: Path,
    *,
    variants: str = "all",
    n: int | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    max_tokens: int = 128,
    threads: int | None = None,
) -> dict[str, Any]:
    """Evaluate `target` (a checkpoint, or a bundle's `variants`) on the first `n` test studies
    of `data_dir`. The payload holds the settings, per-variant "results" (evaluate_runtime plus
    agreement with the first variant) and "skipped": {variant: why it could not run}."""
    from cxrlite.device import resolve_device
    from cxrlite.runtime import BackendError

    device = resolve_device(purpose="evaluation").device
    targets = eval_targets(target, variants, threads, device)
    studies, records = load_eval_data(data_dir, n, seed)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, factory in targets:
        try:
            runtime = factory()
        except (BackendError, ImportError, RuntimeError) as e:
            skipped[name] = str(e)
            continue
        try:
            results[name] = evaluate_runtime(
                runtime, studies, records, max_tokens=max_tokens, n_boot=bootstrap, seed=seed
            )
        finally:
            runtime.close()
    if not results:
        raise EvalError(f"no variant could be evaluated: {skipped}")
    add_agreement(results)
    return {
        "target": str(target),
        "data": str(data_dir),
        "n_studies": len(studies),
        "n_mc": len(records),
        "bootstrap": bootstrap,
        "seed": seed,
        "max_tokens": max_tokens,
        "results": results,
        "skipped": skipped,
    }
