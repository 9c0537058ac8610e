"""cxrlite.eval.metrics: ROUGE-L and BLEU against hand-computed values, findings F1 (per
observation, micro, macro, uncertain handling) against hand-computed cases, bootstrap determinism
and intervals, fairness grouping."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from cxrlite.data.labels import (
    CORE_FINDINGS,
    NEGATIVE,
    POSITIVE,
    UNCERTAIN,
)
from cxrlite.eval.labeler import label_report
from cxrlite.eval.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    bootstrap_ci,
    corpus_bleu,
    f1_cis,
    f1_from_matrices,
    fairness_breakdown,
    findings_f1,
    group_of,
    mean_ci,
    positive_matrix,
    resample_indices,
    rouge_l,
    text_metric_cis,
)


def test_rouge_l_hand_computed():
    # LCS of "the cat sat on the mat" / "the cat is on the mat" is "the cat on the mat": 5 of 6
    # tokens each way, so precision = recall = F = 5/6.
    assert rouge_l(["the cat sat on the mat"], ["the cat is on the mat"]) == [pytest.approx(5 / 6)]
    # LCS "heart normal" (2): precision 2/2, recall 2/4 -> F = 2PR/(P+R) = 2/3
    assert rouge_l(["heart normal"], ["heart size is normal"]) == [pytest.approx(2 / 3)]
    assert rouge_l(["no effusion"], ["no effusion"]) == [pytest.approx(1.0)]
    assert rouge_l(["pneumothorax"], ["cardiomegaly"]) == [0.0]
    with pytest.raises(ValueError):
        rouge_l(["a"], [])


def test_bleu_hand_computed_and_from_statistics():
    # matches 5/6, 3/5, 1/4, 0/3 n-grams; exp smoothing turns the zero 4-gram count into
    # 1 / (2 * 3); brevity penalty 1 (equal lengths): BLEU = (5/6 * 3/5 * 1/4 * 1/6) ** 0.25
    expected = 100 * (5 / 6 * 3 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], ["the cat is on the mat"]) == pytest.approx(
        expected
    )
    assert corpus_bleu(
        ["no acute cardiopulmonary process"], ["no acute cardiopulmonary process"]
    ) == (pytest.approx(100.0))
    hyps = ["the cat sat on the mat", "a dog ran", "no acute findings", ""]
    refs = ["the cat is on the mat", "the dog ran fast", "no acute cardiopulmonary findings", "x"]
    stats = bleu_statistics(hyps, refs)
    assert stats.shape == (4, 10) and stats[0, :4].tolist() == [5, 3, 1, 0]
    assert bleu_from_statistics(stats) == pytest.approx(corpus_bleu(hyps, refs))


def test_f1_from_matrices_hand_case_and_positive_matrix():
    # Hand case, observations (A=Cardiomegaly, B=Edema): A tp 1 fp 1 -> F1 2/3; B fn 1 -> 0.
    pred = np.array([[True, False], [True, False]])
    truth = np.array([[True, True], [False, False]])
    scores = f1_from_matrices(pred, truth)
    assert scores["macro_f1"] == pytest.approx(1 / 3)
    assert scores["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # tp 1, fp 1, fn 1
    # "uncertain" is not positive unless asked; a missing key is "not mentioned"
    rows = [{"Cardiomegaly": "uncertain"}, {"Edema": "positive"}]
    assert positive_matrix(rows, ["Cardiomegaly", "Edema"]).tolist() == [
        [False, False],
        [False, True],
    ]
    assert positive_matrix(rows, ["Cardiomegaly"], uncertain_as="positive").tolist() == [
        [True],
        [False],
    ]
    with pytest.raises(ValueError, match="unknown observations"):
        positive_matrix([{}], ["Not An Observation"])


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    values = np.random.default_rng(0).random(50)
    a = mean_ci(values, n_boot=300, seed=7)
    assert a == mean_ci(values, n_boot=300, seed=7)  # same seed, same interval
    assert a != mean_ci(values, n_boot=300, seed=8)
    assert a["value"] == pytest.approx(values.mean())
    assert a["low"] < a["value"] < a["high"]
    # the normal-theory 95% half-width of a mean is ~1.96 * sd / sqrt(n): the bootstrap agrees
    half = 1.96 * values.std() / math.sqrt(len(values))
    assert (a["high"] - a["low"]) / 2 == pytest.approx(half, rel=0.25)
    constant = mean_ci([1.0] * 10, n_boot=100)
    assert constant == {"value": 1.0, "low": 1.0, "high": 1.0}
    empty = mean_ci([], n_boot=100)
    assert all(math.isnan(v) for v in empty.values())
    indices = resample_indices(5, 4, seed=1)
    assert indices.shape == (4, 5) and indices.min() >= 0 and indices.max() < 5
    assert bootstrap_ci(5, lambda idx: float(len(idx)), indices=indices)["low"] == 5.0


def test_f1_and_text_intervals_contain_their_estimates():
    rng = random.Random(0)
    truth = [{o: rng.choice(["positive", "negative"]) for o in CORE_FINDINGS} for _ in range(30)]
    pred = [{o: (v if rng.random() < 0.8 else "negative") for o, v in t.items()} for t in truth]
    cis = f1_cis(pred, truth, CORE_FINDINGS, n_boot=200, seed=0)
    for ci in cis.values():
        assert 0.0 <= ci["low"] <= ci["value"] <= ci["high"] <= 1.0
    text = text_metric_cis(
        ["the heart size is normal and the lungs are clear", "small left effusion is seen"] * 5,
        ["the heart size is normal and lungs are clear", "a small left pleural effusion is seen"]
        * 5,
        n_boot=100,
    )
    assert text["rouge_l"]["low"] <= text["rouge_l"]["value"] <= text["rouge_l"]["high"]
    assert 0 < text["bleu"]["value"] < 100


def test_fairness_groups_by_sex_and_age_band():
    studies = [
        SimpleNamespace(sex="F", age=25),
        SimpleNamespace(sex="F", age=67),
        SimpleNamespace(sex="M", age=45),
        SimpleNamespace(sex=None, age=None),
    ]
    assert [group_of(s, "sex") for s in studies] == ["F", "F", "M", "unknown"]
    assert [group_of(s, "age") for s in studies] == ["20-39", "60-79", "40-59", "unknown"]
    with pytest.raises(ValueError):
        group_of(studies[0], "race")
    truth = [{"Cardiomegaly": "positive"}] * 4
    # women: both right (F1 1); men and unknown: missed (F1 0)
    pred = [{"Cardiomegaly": "positive"}] * 2 + [{"Cardiomegaly": "negative"}] * 2
    out = fairness_breakdown(
        pred, truth, [group_of(s, "sex") for s in studies], ["Cardiomegaly"], n_boot=50
    )
    assert {k: g["n"] for k, g in out["groups"].items()} == {"F": 2, "M": 1, "unknown": 1}
    assert out["groups"]["F"]["macro_f1"] == {"value": 1.0, "low": 1.0, "high": 1.0}
    assert out["groups"]["M"]["micro_f1"]["value"] == 0.0
    assert out["macro_f1_gap"] == 1.0


# ---- findings_f1 ---------------------------------------------------------------------------

OBS = ("Cardiomegaly", "Edema")
TRUTH = [
    {"Cardiomegaly": POSITIVE, "Edema": POSITIVE},
    {"Cardiomegaly": POSITIVE, "Edema": NEGATIVE},
    {"Cardiomegaly": NEGATIVE, "Edema": UNCERTAIN},
    {"Edema": POSITIVE},  # Cardiomegaly missing = not mentioned
]
PRED = [
    {"Cardiomegaly": POSITIVE, "Edema": NEGATIVE},
    {"Cardiomegaly": POSITIVE, "Edema": POSITIVE},
    {"Cardiomegaly": POSITIVE, "Edema": POSITIVE},
    {"Cardiomegaly": UNCERTAIN, "Edema": POSITIVE},
]


def test_f1_uncertain_as_negative_hand_computed() -> None:
    r = findings_f1(PRED, TRUTH, observations=OBS)
    cm, ed = r["per_observation"]["Cardiomegaly"], r["per_observation"]["Edema"]
    # Cardiomegaly: truth [1,1,0,0], pred [1,1,1,0] -> tp 2, fp 1, fn 0.
    assert (cm["tp"], cm["fp"], cm["fn"], cm["support"]) == (2, 1, 0, 2)
    assert cm["precision"] == pytest.approx(2 / 3) and cm["recall"] == 1.0
    assert cm["f1"] == pytest.approx(0.8)
    # Edema: truth [1,0,0,1], pred [0,1,1,1] -> tp 1, fp 2, fn 1.
    assert (ed["tp"], ed["fp"], ed["fn"]) == (1, 2, 1)
    assert ed["precision"] == pytest.approx(1 / 3) and ed["recall"] == pytest.approx(0.5)
    assert ed["f1"] == pytest.approx(0.4)
    # Micro pools tp 3, fp 3, fn 1; macro averages 0.8 and 0.4.
    assert r["micro_precision"] == pytest.approx(0.5)
    assert r["micro_recall"] == pytest.approx(0.75)
    assert r["micro_f1"] == pytest.approx(0.6)
    assert r["macro_f1"] == pytest.approx(0.6)
    assert r["n"] == 4


def test_f1_uncertain_as_positive_hand_computed() -> None:
    r = findings_f1(PRED, TRUTH, observations=OBS, uncertain_as=POSITIVE)
    # Cardiomegaly: pred [1,1,1,1] -> tp 2, fp 2, fn 0. Edema: truth [1,0,1,1] -> tp 2, fp 1, fn 1.
    assert r["per_observation"]["Cardiomegaly"]["f1"] == pytest.approx(2 / 3)
    assert r["per_observation"]["Edema"]["f1"] == pytest.approx(2 / 3)
    assert r["micro_f1"] == pytest.approx(8 / 12)
    assert r["macro_f1"] == pytest.approx(2 / 3)


def test_f1_perfect_and_empty_classes() -> None:
    truth = [label_report("Moderate cardiomegaly. Small left effusion."), label_report("Clear.")]
    r = findings_f1(truth, truth)
    assert r["per_observation"]["Cardiomegaly"]["f1"] == 1.0
    assert r["per_observation"]["Pleural Effusion"]["f1"] == 1.0
    # No positive anywhere: zero-division scores 0 (sklearn zero_division=0).
    assert r["per_observation"]["Pneumothorax"]["f1"] == 0.0
    assert r["macro_f1"] == pytest.approx(2 / 5)
    assert r["micro_f1"] == 1.0


def test_f1_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1"):
        findings_f1([{}, {}], [{}])
    with pytest.raises(ValueError, match="not one of"):
        findings_f1([{"Edema": "yes"}], [{}])
    with pytest.raises(ValueError, match="unknown observations"):
        findings_f1([{}], [{}], observations=("Edemaa",))
    with pytest.raises(ValueError, match="uncertain_as"):
        findings_f1([{}], [{}], uncertain_as=UNCERTAIN)
