"""Evaluation metrics with bootstrap confidence intervals: labeler F1, ROUGE-L, BLEU, fairness.

- Findings F1 (CheXbert style) of labeled reports: "positive" vs everything else per
  observation, micro (pooled counts) and macro (mean of per-observation F1, 0 where an
  observation has no positive in truth or prediction). The one definition: `findings_f1` (with
  per-observation precision and recall) and the bootstrap both compute it from boolean
  matrices (`positive_matrix`, `f1_from_matrices`), so resampling rows is cheap.
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

from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    CORE_FINDINGS,
    LABEL_VALUES,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
    age_band,
)

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


def positive_matrix(
    labels: Sequence[dict[str, str]],
    observations: Sequence[str],
    uncertain_as: str = NEGATIVE,
    what: str = "labels",
) -> np.ndarray:
    """bool [n, k]: observation j counts as positive in labels i. "positive" does; "negative",
    "not mentioned" and a missing key do not; "uncertain" goes where `uncertain_as` says
    (NEGATIVE or POSITIVE). A value outside LABEL_VALUES raises, naming `what`[i]."""
    unknown = set(observations) - set(CHEXPERT_OBSERVATIONS)
    if unknown:
        raise ValueError(f"unknown observations {sorted(unknown)}")
    if uncertain_as not in (NEGATIVE, POSITIVE):
        raise ValueError(f"uncertain_as must be {NEGATIVE!r} or {POSITIVE!r}, got {uncertain_as!r}")
    counted = (POSITIVE, UNCERTAIN) if uncertain_as == POSITIVE else (POSITIVE,)
    out = np.zeros((len(labels), len(observations)), dtype=bool)
    for i, row in enumerate(labels):
        for j, name in enumerate(observations):
            value = row.get(name, NOT_MENTIONED)
            if value not in LABEL_VALUES:
                raise ValueError(
                    f"{what}[{i}]: {name} has value {value!r}, not one of {LABEL_VALUES}"
                )
            out[i, j] = value in counted
    return out


def _safe_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # sklearn's zero_division=0: an empty denominator scores 0.
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-column true positives, false positives and false negatives of bool [n, k] matrices."""
    return (pred & truth).sum(axis=0), (pred & ~truth).sum(axis=0), (~pred & truth).sum(axis=0)


def f1_from_matrices(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Micro and macro F1 of boolean [n, k] prediction and truth matrices: micro pools the counts
    of every column, macro is the mean of the per-column F1 (0 for a column with no positive in
    truth or prediction)."""
    tp, fp, fn = _counts(pred, truth)
    micro = _safe_f1(np.array(tp.sum()), np.array(fp.sum()), np.array(fn.sum()))
    per = _safe_f1(tp, fp, fn)
    return {"micro_f1": float(micro), "macro_f1": float(per.mean()) if per.size else 0.0}


def findings_f1(
    pred: Sequence[dict[str, str]],
    truth: Sequence[dict[str, str]],
    observations: Sequence[str] = CORE_FINDINGS,
    uncertain_as: str = NEGATIVE,
) -> dict[str, Any]:
    """Precision, recall and F1 per observation of labeled reports, micro- and macro-averaged.

    The positive class is "positive"; `uncertain_as` says where "uncertain" goes: NEGATIVE
    (default, the CheXbert-style "positive vs. everything else" of report-generation papers) or
    POSITIVE (the U-Ones reading), for predictions and truth alike. Micro and macro F1 are
    `f1_from_matrices`'s; precision and recall score 0 on an empty denominator."""
    if len(pred) != len(truth):
        raise ValueError(f"findings_f1: {len(pred)} predictions but {len(truth)} truths")
    p = positive_matrix(pred, observations, uncertain_as, "pred")
    t = positive_matrix(truth, observations, uncertain_as, "truth")
    tp, fp, fn = _counts(p, t)
    precision, recall, f1 = _safe_ratio(tp, tp + fp), _safe_ratio(tp, tp + fn), _safe_f1(tp, fp, fn)
    per = {
        name: {
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "tp": int(tp[j]),
            "fp": int(fp[j]),
            "fn": int(fn[j]),
            "support": int(t[:, j].sum()),
        }
        for j, name in enumerate(observations)
    }
    total_tp, total_fp, total_fn = int(tp.sum()), int(fp.sum()), int(fn.sum())
    return {
        "per_observation": per,
        "micro_precision": total_tp / (total_tp + total_fp) if total_tp + total_fp else 0.0,
        "micro_recall": total_tp / (total_tp + total_fn) if total_tp + total_fn else 0.0,
        **f1_from_matrices(p, t),
        "n": len(pred),
        "uncertain_as": uncertain_as,
    }


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
