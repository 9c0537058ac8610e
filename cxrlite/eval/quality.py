"""The quality gate: how much of the PyTorch model's quality a compressed variant keeps.

`run_variant` runs one runtime on the data (`cxrlite eval` builds its intervals on it too);
`evaluate_variant` aggregates it for one runtime (a bundle's vision + LLM variants, or the PyTorch
reference with the torch backends) on the same held-out data:
- findings F1: greedy findings for each study, labeled by the report labeler, against the
  study's CheXpert truth (macro over CORE_FINDINGS, as `cxrlite eval` scores the model);
- multiple-choice accuracy: the option with the highest log-likelihood (CheXbench style);
- perplexity of report texts, token-level, text only (no image).
`quality_gate` compares a candidate with the reference: a variant is deployable when its
findings F1 drops by at most `max_f1_drop` (and, when given, accuracy and perplexity limits).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cxrlite.data.labels import CORE_FINDINGS
from cxrlite.data.prompts import FINDINGS_MAX_TOKENS
from cxrlite.data.records import Study, TaskRecord
from cxrlite.eval.labeler import label_report
from cxrlite.eval.metrics import findings_f1

logger = logging.getLogger(__name__)

DEFAULT_MAX_F1_DROP = 0.02
_EPS = 1e-9  # a drop equal to the threshold passes despite float rounding


def _image_path(image: str, root: Path | None) -> str:
    path = Path(image)
    return str(path if path.is_absolute() or root is None else root / path)


@dataclass
class VariantOutputs:
    """What one runtime produced on the evaluation data, per study and per record, so callers
    can aggregate (the gate) or resample (`cxrlite eval`'s bootstrap intervals)."""

    generated: list[str]  # greedy findings per study
    hits: dict[str, list[int]]  # MC task -> 1/0 per record (best option == answer)
    perplexity: dict[str, Any]  # runtime.perplexity over the report texts
    n_texts: int
    wall_s: float


def run_variant(
    runtime: Any,
    studies: Sequence[Study],
    mc_records: Sequence[TaskRecord],
    report_texts: Sequence[str],
    *,
    image_root: str | Path | None = None,
    max_tokens: int = FINDINGS_MAX_TOKENS,
    prompt: str | None = None,
) -> VariantOutputs:
    """Greedy findings for each study (asked with `prompt`, else the model's own findings prompt
    when it has one, else cxrlite's), the option chosen by likelihood for each multiple-choice
    record (records without options are skipped), perplexity of the report texts."""
    root = Path(image_root) if image_root is not None else None
    started = time.perf_counter()

    def findings(study: Study) -> str:
        image = _image_path(study.image, root)
        return runtime.findings(image, prompt=prompt, max_tokens=max_tokens).text.strip()

    def chosen(record: TaskRecord) -> str:
        image = _image_path(record.images[0], root) if record.images else None
        scores = runtime.option_logprobs(record.prompt, record.options, image)
        return record.options[max(range(len(scores)), key=scores.__getitem__)]

    # Studies (and records) batched: up to the runtime's slots decoded together; each record's
    # options share its prompt's KV cache (Runtime.option_logprobs).
    generated = list(runtime.map(findings, studies))
    scored = [record for record in mc_records if record.options]
    hits: dict[str, list[int]] = defaultdict(list)
    for record, best in zip(scored, runtime.map(chosen, scored), strict=True):
        hits[record.task].append(int(best == record.answer))
    texts = [t for t in report_texts if t and t.strip()]
    ppl = runtime.perplexity(texts) if texts else {"perplexity": math.nan, "n_tokens": 0}
    return VariantOutputs(generated, dict(hits), ppl, len(texts), time.perf_counter() - started)


def evaluate_variant(
    runtime: Any,
    studies: Sequence[Study],
    mc_records: Sequence[TaskRecord],
    report_texts: Sequence[str],
    **options: Any,
) -> dict[str, Any]:
    """Findings F1, multiple-choice accuracy and perplexity of `runtime` (a
    cxrlite.runtime.Runtime) on the given data; `options` are run_variant's (image_root,
    max_tokens, prompt)."""
    out = run_variant(runtime, studies, mc_records, report_texts, **options)
    findings = findings_f1(
        [label_report(text) for text in out.generated], [s.chexpert for s in studies], CORE_FINDINGS
    )
    hits, ppl = out.hits, out.perplexity
    all_hits = [h for task in hits.values() for h in task]
    result = {
        "variants": dict(runtime.variants),
        "findings_f1": findings["macro_f1"],
        "findings": findings,
        "mc_accuracy": sum(all_hits) / len(all_hits) if all_hits else math.nan,
        "mc": {t: {"accuracy": sum(h) / len(h), "n": len(h)} for t, h in sorted(hits.items())},
        "perplexity": ppl["perplexity"],
        "n_studies": len(studies),
        "n_mc": len(all_hits),
        "n_texts": out.n_texts,
        "n_tokens": ppl["n_tokens"],
        "wall_s": round(out.wall_s, 3),
    }
    logger.info(
        "quality of %s: findings F1 %.3f, MC accuracy %.3f, perplexity %.3f (%d studies, %.1f s)",
        result["variants"], result["findings_f1"], result["mc_accuracy"], result["perplexity"],
        len(studies), result["wall_s"],
    )  # fmt: skip
    return result


def quality_gate(
    reference: dict[str, Any],
    candidate: dict[str, Any],
    max_f1_drop: float = DEFAULT_MAX_F1_DROP,
    *,
    max_accuracy_drop: float | None = None,
    max_perplexity_ratio: float | None = None,
) -> tuple[bool, dict[str, Any]]:
    """(deployable, deltas): deltas are candidate - reference for F1 and accuracy, the
    perplexity ratio, and which limits failed. F1 always gates; accuracy and perplexity gate
    only when their limit is given."""
    f1_delta = candidate["findings_f1"] - reference["findings_f1"]
    acc_delta = candidate.get("mc_accuracy", math.nan) - reference.get("mc_accuracy", math.nan)
    ref_ppl, cand_ppl = reference.get("perplexity", math.nan), candidate.get("perplexity", math.nan)
    ratio = cand_ppl / ref_ppl if ref_ppl and math.isfinite(ref_ppl) else math.nan
    failed = []
    if not -f1_delta <= max_f1_drop + _EPS:
        failed.append(f"findings F1 dropped {-f1_delta:.4f} > {max_f1_drop}")
    if max_accuracy_drop is not None and not -acc_delta <= max_accuracy_drop + _EPS:
        failed.append(f"MC accuracy dropped {-acc_delta:.4f} > {max_accuracy_drop}")
    if max_perplexity_ratio is not None and not ratio <= max_perplexity_ratio + _EPS:
        failed.append(f"perplexity ratio {ratio:.4f} > {max_perplexity_ratio}")
    deltas = {
        "findings_f1": f1_delta,
        "mc_accuracy": acc_delta,
        "perplexity_ratio": ratio,
        "max_f1_drop": max_f1_drop,
        "failed": failed,
    }
    return not failed, deltas


@dataclass
class HeldOut:
    """Held-out phantoms on disk (absolute image paths), their multiple-choice task records and
    report texts. Use as a context manager (or call cleanup) to remove a temporary folder."""

    root: Path
    studies: list[Study]
    mc_records: list[TaskRecord]
    report_texts: list[str]
    _temporary: bool = field(default=False, repr=False)

    def cleanup(self) -> None:
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> HeldOut:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


def held_out_phantoms(
    n: int, seed: int = 0, size: int = 256, out_dir: str | Path | None = None
) -> HeldOut:
    """`n` phantoms from the test split of `seed` (never in a training set drawn from its train
    split), written as PNGs, with their multiple-choice tasks: quality data for bundles whose
    training data is not at hand."""
    from cxrlite.data.tasks import build_tasks
    from cxrlite.fileio import atomic_write_bytes
    from cxrlite.imaging.write import png_bytes
    from cxrlite.phantoms.generator import make_phantom_study, study_split

    if n < 1:
        raise ValueError(f"held_out_phantoms: n must be >= 1, got {n}")
    temporary = out_dir is None
    root = Path(tempfile.mkdtemp(prefix="cxrlite-heldout-") if temporary else out_dir)
    studies, index = [], 0
    while len(studies) < n:
        if study_split(seed, index) == "test":
            study, pixels = make_phantom_study(seed, index, size=size)
            path = root / study.image
            atomic_write_bytes(path, png_bytes(pixels), fsync=False)
            studies.append(replace(study, image=str(path.resolve())))
        index += 1
    records = [r for r in build_tasks(studies, seed=seed) if r.options]
    return HeldOut(root, studies, records, [s.narrative for s in studies], temporary)
