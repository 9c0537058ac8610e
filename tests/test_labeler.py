"""The rule-based CheXpert labeler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    LABEL_VALUES,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
)
from cxrlite.eval.labeler import label_report, label_reports

SENTENCES = Path(__file__).parent / "data" / "labeler_sentences.jsonl"
REQUIRED_ACCURACY = 0.97  # per (sentence, observation) pair; the test prints the current figure


def _rows() -> list[dict]:
    return [json.loads(line) for line in SENTENCES.read_text(encoding="utf-8").splitlines()]


def test_sentence_set_is_well_formed() -> None:
    rows = _rows()
    assert len(rows) >= 120
    assert len({r["text"] for r in rows}) == len(rows)
    for row in rows:
        for name, value in row["expected"].items():
            assert name in CHEXPERT_OBSERVATIONS and value in LABEL_VALUES
            assert value != NOT_MENTIONED  # only the stated observations are listed


def test_accuracy_on_hand_written_sentences() -> None:
    rows = _rows()
    correct, wrong = 0, []
    for row, got in zip(rows, label_reports(r["text"] for r in rows), strict=True):
        for name in CHEXPERT_OBSERVATIONS:
            expected = row["expected"].get(name, NOT_MENTIONED)
            if got[name] == expected:
                correct += 1
            else:
                wrong.append((row["text"], name, got[name], expected))
    accuracy = correct / (len(rows) * len(CHEXPERT_OBSERVATIONS))
    print(f"labeler accuracy: {accuracy:.4f} over {len(rows)} sentences; wrong: {wrong}")
    assert accuracy >= REQUIRED_ACCURACY, wrong


@pytest.mark.parametrize(
    ("text", "name", "value"),
    [
        ("No focal consolidation, effusion, or pneumothorax.", "Pneumothorax", NEGATIVE),
        ("No change in the moderate right effusion.", "Pleural Effusion", POSITIVE),
        ("Pneumothorax is not excluded.", "Pneumothorax", UNCERTAIN),
        ("Small effusion; pneumonia is not excluded.", "Pleural Effusion", POSITIVE),
        ("Bibasilar atelectasis versus pneumonia.", "Atelectasis", UNCERTAIN),
        ("There is no pneumothorax, but a small effusion persists.", "Pleural Effusion", POSITIVE),
        ("The right pneumothorax has resolved.", "Pneumothorax", NEGATIVE),
        ("The right pneumothorax has partially resolved.", "Pneumothorax", POSITIVE),
        ("Normal heart size.", "Cardiomegaly", NEGATIVE),
        ("Heart size is unchanged.", "Cardiomegaly", UNCERTAIN),
        ("The heart is seen.", "Cardiomegaly", NOT_MENTIONED),
        ("Evaluate for pneumonia.", "Pneumonia", NOT_MENTIONED),
        ("INDICATION: pneumonia? FINDINGS: Clear lungs.", "Pneumonia", NOT_MENTIONED),
        ("Small pericardial effusion.", "Pleural Effusion", NOT_MENTIONED),
        ("Left basilar opacity, likely atelectasis.", "Lung Opacity", POSITIVE),
    ],
)
def test_rules(text: str, name: str, value: str) -> None:
    assert label_report(text)[name] == value


def test_aggregation_positive_beats_uncertain_beats_negative() -> None:
    assert (
        label_report("Possible left effusion. Large right effusion.")["Pleural Effusion"]
        == POSITIVE
    )
    assert label_report("No effusion. Possible small effusion.")["Pleural Effusion"] == UNCERTAIN
    assert label_report("No effusion. Effusions are absent.")["Pleural Effusion"] == NEGATIVE


def test_no_finding_rule() -> None:
    assert label_report("No acute cardiopulmonary process.")["No Finding"] == POSITIVE
    # Devices do not count; negatives do not count.
    devices = label_report("Endotracheal tube 4 cm above the carina. No pneumothorax.")
    assert devices["No Finding"] == POSITIVE and devices["Support Devices"] == POSITIVE
    assert label_report("Possible small effusion.")["No Finding"] == NOT_MENTIONED
    # An abnormality outside the 14 observations still rules out No Finding (CheXpert).
    assert label_report("Degenerative changes of the spine.")["No Finding"] == NOT_MENTIONED
    empty = label_report("   ")
    assert set(empty.values()) == {NOT_MENTIONED}


def test_output_shape_and_bad_input() -> None:
    out = label_reports(["Moderate cardiomegaly.", ""])
    assert [tuple(o) for o in out] == [CHEXPERT_OBSERVATIONS] * 2
    assert out[0]["Cardiomegaly"] == POSITIVE
    with pytest.raises(TypeError, match="report text"):
        label_report(None)  # type: ignore[arg-type]
