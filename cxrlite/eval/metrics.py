"""Evaluation metrics with bootstrap confidence intervals: labeler F1, ROUGE-L, BLEU, fairness.

- Findings F1 (CheXbert style): "positive" vs everything else per observation, micro (pooled
  counts) and macro (mean of per-observation F1, 0 where an observation has no positive in
  truth or prediction), exactly as `cxrlite.eval.labeler.findings_f1` defines them, but computed
  from boolean matrices so a bootstrap can recompute it a thousand times cheaply.
- ROUGE-L: the `rouge-score` package (Google's reference implementation), F-measure per pair,
  averaged.
- BLEU: `sacrebleu` corpus BLEU (13a tokenizer, exp smoothing). For the bootstrap, each
  sentence's n-gram statistics are extracted once and corpus BLEU is recomputed from their sums
  with `BLEU.compute_bleu`, which equals `corpus_score` on the resampled corpus.
- Bootstrap: percentile intervals over resamples of the items (studies) with replacement, from a
  seeded generator, so the same seed gives the same interval; every metric of one evaluation
  uses the same resamples (a paired bootstrap).
- Fairness: findings F1 within groups of studies (patient sex, age band), each with its own
  bootstrap interval, and the largest gap between groups.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, CORE_FINDINGS, POSITIVE, age_band

logger = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP = 1000
DEFAULT_ALPHA = 0.05  # 95% intervals
UNKNOWN_GROUP = "unknown"


# --- bootstrap ---------------------------------------------------------------------------------


def resample_indices(n_items: int, n_boot: int, seed: int) -> np.ndarray:
    """int [n_boot, n_items]: row b is the b-th resample (with replacement) of range(n_items)."""
    if n_items < 0 or n_boot < 0:
        raise ValueError(f"n_items and n_boot must be >= 0, got {n_items}, {n_boot}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, max(n_items, 1), size=(n_boot, n_items))


def bootstrap_ci(
    n_items: int,
    statistic: Callable[[np.ndarray], float],
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    indices: np.ndarray | None = None,
) -> dict[str, float]:
    """{"value", "low", "high"}: `statistic(index array)` on all items, and the percentile
    interval of its values over `n_boot` resamples (or the given `indices`, to pair several
    metrics). No items: every figure is NaN."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_items == 0:
        return {"value": math.nan, "low": math.nan, "high": math.nan}
    value = float(statistic(np.arange(n_items)))
    if indices is None:
        indices = resample_indices(n_items, n_boot, seed)
    if len(indices) == 0:
        return {"value": value, "low": math.nan, "high": math.nan}
    stats = np.array([statistic(row) for row in indices], dtype=np.float64)
    low, high = np.nanpercentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"value": value, "low": float(low), "high": float(high)}


def mean_ci(values: Sequence[float], **kwargs: Any) -> dict[str, float]:
    """bootstrap_ci of the mean of per-item values (accuracy hits, ROUGE-L scores...)."""
    array = np.asarray(values, dtype=np.float64)
    return bootstrap_ci(len(array), lambda idx: float(array[idx].mean()), **kwargs)


# --- findings F1 -------------------------------------------------------------------------------


def positive_matrix(labels: Sequence[dict[str, str]], observations: Sequence[str]) -> np.ndarray:
    """bool [n, k]: observation j is "positive" in labels i (uncertain counts as not positive,
    as `findings_f1`'s default)."""
    unknown = set(observations) - set(CHEXPERT_OBSERVATIONS)
    if unknown:
        raise ValueError(f"unknown observations {sorted(unknown)}")
    return np.array(
        [[row.get(name) == POSITIVE for name in observations] for row in labels], dtype=bool
    ).reshape(len(labels), len(observations))


def _safe_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def f1_from_matrices(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 of boolean [n, k] prediction and truth matrices."""
    tp = (pred & truth).sum(axis=0)
    fp = (pred & ~truth).sum(axis=0)
    fn = (~pred & truth).sum(axis=0)
    micro = _safe_f1(np.array(tp.sum()), np.array(fp.sum()), np.array(fn.sum()))
    per = _safe_f1(tp, fp, fn)
    return {"micro_f1": float(micro), "macro_f1": float(per.mean()) if per.size else 0.0}


def f1_cis(
    pred_labels: Sequence[dict[str, str]],
    true_labels: Sequence[dict[str, str]],
    observations: Sequence[str] = CORE_FINDINGS,
    **kwargs: Any,
) -> dict[str, dict[str, float]]:
    """{"micro_f1": ci, "macro_f1": ci} of labeler findings over `observations`."""
    if len(pred_labels) != len(true_labels):
        raise ValueError(f"{len(pred_labels)} predictions but {len(true_labels)} truths")
    pred = positive_matrix(pred_labels, observations)
    truth = positive_matrix(true_labels, observations)
    return {
        kind: bootstrap_ci(
            len(pred),
            lambda idx, kind=kind: f1_from_matrices(pred[idx], truth[idx])[kind],
            **kwargs,
        )
        for kind in ("micro_f1", "macro_f1")
    }


# --- text overlap ------------------------------------------------------------------------------


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [
        float(scorer.score(ref or "", pred or "")["rougeL"].fmeasure)
        for pred, ref in zip(predictions, references, strict=True)
    ]


def bleu_statistics(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """float [n, 10] per-sentence BLEU statistics: 4 matched n-gram counts, 4 totals, hypothesis
    length, reference length (sacrebleu's tokenization)."""
    from sacrebleu.metrics import BLEU

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = BLEU(effective_order=True)  # counts are the same; it only silences a warning
    rows = []
    for pred, ref in zip(predictions, references, strict=True):
        s = scorer.sentence_score(pred or "", [ref or ""])
        rows.append([*s.counts, *s.totals, s.sys_len, s.ref_len])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), 10)


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100) of the summed per-sentence statistics."""
    from sacrebleu.metrics import BLEU

    total = stats.sum(axis=0)
    return float(
        BLEU.compute_bleu(
            [int(x) for x in total[:4]],
            [int(x) for x in total[4:8]],
            int(total[8]),
            int(total[9]),
            smooth_method="exp",
        ).score
    )


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100) with one reference per prediction."""
    from sacrebleu.metrics import BLEU

    return float(BLEU().corpus_score(list(predictions), [list(references)]).score)


def text_metric_cis(
    predictions: Sequence[str], references: Sequence[str], **kwargs: Any
) -> dict[str, dict[str, float]]:
    """{"rouge_l": ci, "bleu": ci}."""
    stats = bleu_statistics(predictions, references)
    return {
        "rouge_l": mean_ci(rouge_l(predictions, references), **kwargs),
        "bleu": bootstrap_ci(len(stats), lambda idx: bleu_from_statistics(stats[idx]), **kwargs),
    }


# --- fairness ----------------------------------------------------------------------------------


def group_of(study: Any, by: str) -> str:
    """The study's group: its sex ("F", "M") or age band (labels.age_band), else "unknown"."""
    if by == "sex":
        return getattr(study, "sex", None) or UNKNOWN_GROUP
    if by == "age":
        return age_band(getattr(study, "age", None))
    raise ValueError(f"fairness groups are 'sex' or 'age', not {by!r}")


def fairness_breakdown(
    pred_labels: Sequence[dict[str, str]],
    true_labels: Sequence[dict[str, str]],
    groups: Sequence[str],
    observations: Sequence[str] = CORE_FINDINGS,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Findings F1 (micro, macro, with CIs) within each group, and the macro-F1 gap (largest
    minus smallest) between groups of at least one study."""
    if not len(pred_labels) == len(true_labels) == len(groups):
        raise ValueError("fairness_breakdown: predictions, truths and groups differ in length")
    out: dict[str, Any] = {"groups": {}}
    for name in sorted(set(groups)):
        members = [i for i, g in enumerate(groups) if g == name]
        scores = f1_cis(
            [pred_labels[i] for i in members],
            [true_labels[i] for i in members],
            observations,
            n_boot=n_boot,
            seed=seed,
        )
        out["groups"][name] = {"n": len(members), **scores}
    macro = [g["macro_f1"]["value"] for g in out["groups"].values()]
    out["macro_f1_gap"] = float(max(macro) - min(macro)) if macro else math.nan
    return out
