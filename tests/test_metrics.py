"""cxrlite.eval.metrics: ROUGE-L and BLEU against hand-computed values, F1 against the labeler's
findings_f1, bootstrap determinism and intervals, fairness grouping."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, CORE_FINDINGS, LABEL_VALUES
from cxrlite.eval.labeler import findings_f1
from cxrlite.eval.metrics import (
    bleu_from_statistics,
    bleu_statistics,
    bootstrap_ci,
    corpus_bleu,
    f1_cis,
    f1_from_matrices,
    fairness_breakdown,
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
    assert expected == pytest.approx(37.99, abs=0.01)
    assert corpus_bleu(
        ["no acute cardiopulmonary process"], ["no acute cardiopulmonary process"]
    ) == (pytest.approx(100.0))
    hyps = ["the cat sat on the mat", "a dog ran", "no acute findings", ""]
    refs = ["the cat is on the mat", "the dog ran fast", "no acute cardiopulmonary findings", "x"]
    stats = bleu_statistics(hyps, refs)
    assert stats.shape == (4, 10) and stats[0, :4].tolist() == [5, 3, 1, 0]
    assert bleu_from_statistics(stats) == pytest.approx(corpus_bleu(hyps, refs))


def test_f1_matches_findings_f1_and_a_hand_case():
    # Hand case, observations (A=Cardiomegaly, B=Edema): A tp 1 fp 1 -> F1 2/3; B fn 1 -> 0.
    pred = np.array([[True, False], [True, False]])
    truth = np.array([[True, True], [False, False]])
    scores = f1_from_matrices(pred, truth)
    assert scores["macro_f1"] == pytest.approx(1 / 3)
    assert scores["micro_f1"] == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))  # tp 1, fp 1, fn 1
    rng = random.Random(3)
    labels = [
        [{o: rng.choice(LABEL_VALUES) for o in CHEXPERT_OBSERVATIONS} for _ in range(40)]
        for _ in range(2)
    ]
    for observations in (CORE_FINDINGS, CHEXPERT_OBSERVATIONS):
        want = findings_f1(labels[0], labels[1], observations)
        got = f1_from_matrices(
            positive_matrix(labels[0], observations), positive_matrix(labels[1], observations)
        )
        assert got["micro_f1"] == pytest.approx(want["micro_f1"])
        assert got["macro_f1"] == pytest.approx(want["macro_f1"])
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
