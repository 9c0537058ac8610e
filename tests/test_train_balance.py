"""Balanced sampling of rare findings (train/balance.py): which records repeat, how often."""

from __future__ import annotations

from collections import Counter

import pytest

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, NEGATIVE, POSITIVE
from cxrlite.data.records import Study
from cxrlite.data.tasks import build_tasks
from cxrlite.train.balance import oversample_positives, study_repeats


def _study(study_id: str, **positive: str) -> Study:
    labels = {obs: NEGATIVE for obs in CHEXPERT_OBSERVATIONS}
    labels.update({k.replace("_", " "): POSITIVE for k in positive})
    return Study(study_id, f"images/{study_id}.png", "train", "chexpert",
                 findings="Text.", impression="Text.", chexpert=labels, view="PA")  # fmt: skip


BOOST = {"Pleural Effusion": 3.0, "Pneumothorax": 1.5}


def test_study_repeats_is_the_largest_boost_of_its_positives():
    assert study_repeats(_study("a"), BOOST) == 1.0
    assert study_repeats(_study("b", Cardiomegaly="y"), BOOST) == 1.0
    assert study_repeats(_study("c", Pneumothorax="y"), BOOST) == 1.5
    assert study_repeats(_study("d", Pneumothorax="y", Pleural_Effusion="y"), BOOST) == 3.0


def test_oversampling_repeats_whole_studies_deterministically():
    studies = [_study("normal"), _study("eff", Pleural_Effusion="y")]
    studies += [_study(f"ptx{i}", Pneumothorax="y") for i in range(200)]
    records = build_tasks(studies, tasks=["findings_generation", "view_classification"])
    pool = oversample_positives(records, studies, BOOST, seed=1)
    per_study = Counter(r.id.rsplit(":", 2)[0] for r in pool)
    assert per_study["normal"] == 2 and per_study["eff"] == 6  # two tasks each, x1 and x3
    # a 1.5 boost: every record once, about half of them twice
    extra = sum(per_study[f"ptx{i}"] - 2 for i in range(200))
    assert 150 < extra < 250
    assert pool == oversample_positives(records, studies, BOOST, seed=1)
    assert oversample_positives(records, studies, {}) == records


def test_boost_below_one_is_refused():
    with pytest.raises(ValueError, match=">= 1"):
        oversample_positives([], [], {"Edema": 0.5})


def test_only_the_given_tasks_are_boosted():
    studies = [_study("normal"), _study("eff", Pleural_Effusion="y")]
    records = build_tasks(studies, tasks=["findings_generation", "view_classification"])
    pool = oversample_positives(records, studies, BOOST, seed=1, tasks=["findings_generation"])
    per_task = Counter((r.id.rsplit(":", 2)[0], r.task) for r in pool)
    assert per_task[("eff", "findings_generation")] == 3
    assert per_task[("eff", "view_classification")] == 1  # the view task keeps its distribution
    assert per_task[("normal", "findings_generation")] == 1
