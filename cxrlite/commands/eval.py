"""`cxrlite eval`: CheXbench-style evaluation of a checkpoint or each variant of a bundle.

Multiple choice (view, binary disease, single / multi disease identification, location and
severity VQA, hard-negative image-text reasoning) is scored by option log-likelihood; findings
generation by the report labeler (14-observation and 5-core-finding micro/macro F1), ROUGE-L and
BLEU; perplexity on the reference reports; fairness as findings F1 by sex and age band. Every
figure has a seeded bootstrap 95% interval (cxrlite.eval.metrics). Runs go through cxrlite.runtime, so
a checkpoint (torch backends) and a bundle's variants are measured by the same code, the one the
quantization quality gate uses (cxrlite.eval.quality.run_variant); this module adds the intervals.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

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


# --- data and targets ------------------------------------------------------------------------


def load_eval_data(data_dir: Path, n: int | None, seed: int) -> tuple[list[Any], list[Any]]:
    """The test split of a dataset folder (any layout cxrlite.data reads), its first `n` studies,
    and their multiple-choice task records."""
    from cxrlite.data.datasets import load_dataset
    from cxrlite.data.tasks import build_tasks

    studies = [s for s in load_dataset("auto", data_dir) if s.split == "test"]
    if not studies:
        raise ValueError(f"{data_dir}: no studies in the test split")
    studies = studies[:n] if n else studies
    records = [r for r in build_tasks(studies, seed=seed, tasks=MC_TASKS) if r.options]
    return studies, records


def checkpoint_runtime(ckpt: Path, threads: int | None = None) -> Any:
    """A Runtime over a checkpoint's own PyTorch model (torch vision + torch LLM backends)."""
    import torch

    from cxrlite.imaging.preprocess import PreprocessConfig
    from cxrlite.model.checkpoint import load
    from cxrlite.runtime import Runtime, TorchLLMBackend, TorchVision

    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, cfg = load(ckpt, device=device)
    # Runtime reads only config, preprocess and path from its bundle argument.
    source = SimpleNamespace(
        config=cfg, preprocess=PreprocessConfig.from_dict(cfg.preprocess), path=ckpt
    )
    llm = TorchLLMBackend(model.llm, REFERENCE, n_ctx=min(cfg.llm.max_position_embeddings, 4096))
    return Runtime(source, TorchVision(model, REFERENCE), llm, tokenizer)


def eval_targets(target: Path, variants: str, threads: int | None) -> list[tuple[str, Any]]:
    """[(name, zero-argument runtime factory)] for a checkpoint or a bundle's variants: each LLM
    variant on the default vision variant, each other vision variant on the default LLM, and the
    PyTorch reference when the bundle's source checkpoint is present."""
    if (target / "config.json").is_file() and not (target / "manifest.json").is_file():
        return [(REFERENCE, lambda: checkpoint_runtime(target, threads))]
    from cxrlite.bundle import load_bundle
    from cxrlite.runtime import BackendError, Runtime
    from cxrlite.runtime.plan import reference_checkpoint

    bundle = load_bundle(target)
    wanted = None if variants == "all" else {v.strip() for v in variants.split(",") if v.strip()}
    known = {REFERENCE, *bundle.llm_variants, *bundle.vision_variants}
    if wanted and wanted - known:
        raise ValueError(
            f"unknown variants {sorted(wanted - known)}; the bundle has {sorted(known)}"
        )

    def runtime(**kw: Any):
        return lambda: Runtime.from_bundle(
            target, threads=threads, warmup=False, verify=False, **kw
        )

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
        raise ValueError(f"{target}: nothing to evaluate (variants {variants!r})")
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


# --- tables ----------------------------------------------------------------------------------


def _ci(stat: dict[str, float], scale: float = 100.0) -> str:
    if stat is None or not math.isfinite(stat.get("value", math.nan)):
        return "-"
    low, high = stat["low"] * scale, stat["high"] * scale
    return f"{stat['value'] * scale:.1f} [{low:.1f}, {high:.1f}]"


def eval_tables(results: dict[str, dict[str, Any]]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """{title: (header, rows)} of the comparison, per-task accuracy and fairness."""
    main_rows = []
    for name, r in results.items():
        f5, f14 = r["findings"]["core5"], r["findings"]["chexpert14"]
        main_rows.append([
            name, _ci(r["mc"]["all"]), _ci(f5["macro_f1"]), _ci(f5["micro_f1"]),
            _ci(f14["macro_f1"]), _ci(f14["micro_f1"]), _ci(r["text"]["rouge_l"]),
            _ci(r["text"]["bleu"], 1.0), f"{r['perplexity']:.2f}",
            f"{100 * r.get('same_text_as_reference', math.nan):.0f}", f"{r['wall_s']:.1f}",
        ])  # fmt: skip
    tables = {
        "Comparison (95% bootstrap CI)": (
            [
                "variant",
                "MC acc %",
                "F1-5 macro",
                "F1-5 micro",
                "F1-14 macro",
                "F1-14 micro",
                "ROUGE-L",
                "BLEU",
                "ppl",
                "same text %",
                "s",
            ],
            main_rows,
        )  # fmt: skip
    }
    tasks = [t for t in MC_TASKS if any(t in r["mc"] for r in results.values())]
    tables["Multiple choice accuracy % by task"] = (
        ["task", *results],
        [[t, *(_ci(r["mc"].get(t)) + f" n={r['mc'].get(t, {}).get('n', 0)}" for r in results.values())]
         for t in tasks],
    )  # fmt: skip
    fair_rows = []
    for name, r in results.items():
        for by, breakdown in r["fairness"].items():
            for group, g in breakdown["groups"].items():
                fair_rows.append(
                    [name, f"{by}={group}", str(g["n"]), _ci(g["macro_f1"]), _ci(g["micro_f1"])]
                )
            fair_rows.append([name, f"{by} gap", "", f"{100 * breakdown['macro_f1_gap']:.1f}", ""])
    tables["Fairness: findings F1 (5 core findings) by group"] = (
        ["variant", "group", "n", "macro F1", "micro F1"],
        fair_rows,
    )
    return tables


def to_markdown(payload: dict[str, Any]) -> str:
    lines = [f"# cxrlite eval: {payload['target']}", "",
             f"- data: {payload['data']} ({payload['n_studies']} test studies, "
             f"{payload['n_mc']} multiple-choice records), bootstrap {payload['bootstrap']} "
             f"resamples, seed {payload['seed']}"]  # fmt: skip
    for title, (header, rows) in eval_tables(payload["results"]).items():
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines += ["|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if payload.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in payload["skipped"].items()]
    return "\n".join(lines) + "\n"


# fmt: off
@click.command("eval")
@click.argument("target", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--data", "data_dir", type=click.Path(exists=True, path_type=Path), required=True,
              help="Dataset folder (phantoms, MIMIC-CXR-JPG, CheXpert, IU X-ray, PadChest, JSONL); its test split is used.")
@click.option("--variants", default="all", show_default=True,
              help="Bundle variants to evaluate, comma-separated (torch-fp32 is the reference), or 'all'.")
@click.option("--n", type=click.IntRange(1), default=None, help="Evaluate only the first N test studies.")
@click.option("--bootstrap", type=click.IntRange(0), default=1000, show_default=True, help="Bootstrap resamples for the 95% CIs.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the task options and the bootstrap.")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=128, show_default=True, help="Longest generated findings.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Write eval.json and eval.md here.")
def eval_command(target: Path, data_dir: Path, variants: str, n: int | None, bootstrap: int, seed: int,
                 max_tokens: int, threads: int | None, out: Path | None) -> None:
    """Evaluate TARGET, a checkpoint (PyTorch) or a bundle (each variant, and the PyTorch
    reference when its source checkpoint is present), on the test split of --data: multiple
    choice by option likelihood, findings F1 (14 and 5 labels), ROUGE-L, BLEU, perplexity and
    F1 by sex and age band, each with a bootstrap 95% CI; one comparison table."""
    from rich.console import Console
    from rich.table import Table

    from cxrlite.runtime import BackendError

    studies, records = load_eval_data(data_dir, n, seed)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, factory in eval_targets(target, variants, threads):
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
        raise ValueError(f"no variant could be evaluated: {skipped}")
    add_agreement(results)
    payload = {"target": str(target), "data": str(data_dir), "n_studies": len(studies), "n_mc": len(records),
               "bootstrap": bootstrap, "seed": seed, "max_tokens": max_tokens, "results": results,
               "skipped": skipped}
    console = Console(width=max(Console().width, 160))
    for title, (header, rows) in eval_tables(results).items():
        table = Table(title=title, title_justify="left")
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for name, why in skipped.items():
        console.print(f"[dim]skipped {name}: {why}[/]")
    if out is not None:
        from cxrlite.fileio import atomic_write_text, write_json

        write_json(out / "eval.json", json.loads(json.dumps(payload, default=float)))
        atomic_write_text(out / "eval.md", to_markdown(payload))
        click.echo(f"wrote {out / 'eval.json'}, {out / 'eval.md'}", err=True)
# fmt: on
