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


# --- the corpus of report sentences (tests/data/labeler_corpus.md) ------------------------

SCORED = ("Cardiomegaly", "Pleural Effusion", "Atelectasis", "Edema", "Pneumothorax", "Lung Lesion")


def _corpus() -> list[dict]:
    path = Path(__file__).parent / "data" / "labeler_corpus.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _f1(pairs: list[tuple[str, str]], asserted: set[str]) -> float:
    tp = sum(g in asserted and w in asserted for g, w in pairs)
    fp = sum(g in asserted and w not in asserted for g, w in pairs)
    fn = sum(w in asserted and g not in asserted for g, w in pairs)
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def test_corpus_per_label_f1_and_exact_values() -> None:
    """Per scored observation: F1 of "asserted" (positive or uncertain, what a finding-level
    score counts) and of "positive" alone, and the share of exact values over the corpus."""
    rows = _corpus()
    assert len(rows) >= 300
    report = {}
    for obs in SCORED:
        pairs = [(label_report(r["text"])[obs], r["labels"].get(obs, NOT_MENTIONED)) for r in rows]
        report[obs] = {
            "asserted_f1": _f1(pairs, {POSITIVE, UNCERTAIN}),
            "positive_f1": _f1(pairs, {POSITIVE}),
            "exact": sum(g == w for g, w in pairs) / len(pairs),
        }
    print(json.dumps(report, indent=1))
    for obs, scores in report.items():
        assert scores["asserted_f1"] >= 0.97 and scores["positive_f1"] >= 0.95, (obs, scores)
        assert scores["exact"] >= 0.98, (obs, scores)
    macro = sum(s["asserted_f1"] for s in report.values()) / len(report)
    assert macro >= 0.98, report


@pytest.mark.parametrize("cls", ["negation_list", "hedge_elsewhere", "synonym", "negated_qualifier",
                                 "uncertain", "pseudo", "positive", "indication"])  # fmt: skip
def test_every_failure_class_is_covered_and_read_right(cls: str) -> None:
    rows = [r for r in _corpus() if r["class"] == cls]
    assert len(rows) >= 40
    wrong = [
        (r["text"], obs, value, label_report(r["text"])[obs])
        for r in rows
        for obs, value in r["labels"].items()
        if label_report(r["text"])[obs] != value
    ]
    assert len(wrong) <= 0.03 * len(rows), wrong


def test_explain_names_the_phrase_rule_cue_and_scope() -> None:
    from cxrlite.eval.labeler import explain_report

    text = (
        "No focal consolidation, suspicious pulmonary opacity, large pleural effusion, or "
        "pneumothorax is identified. A small right effusion may be present."
    )
    by_phrase = {(d.observation, d.phrase): d for d in explain_report(text)}
    negated = by_phrase[("Pneumothorax", "pneumothorax")]
    assert (negated.value, negated.rule, negated.cue) == (NEGATIVE, "negation", "no")
    assert negated.clause.startswith("no focal consolidation, suspicious")
    hedged = [d for d in explain_report(text) if d.rule == "hedge"]
    assert [(d.observation, d.value, d.cue) for d in hedged] == [
        ("Pleural Effusion", UNCERTAIN, "may be present")
    ]
    assert label_report(text)["Pleural Effusion"] == UNCERTAIN  # uncertain beats negative


def test_the_scan_guards_never_hide_a_match() -> None:
    """Each pattern skips texts without the literal words its alternatives begin with; on the
    whole corpus, a guarded scan finds exactly what the plain regex finds."""
    from cxrlite.eval import labeler_rules as rules
    from cxrlite.eval.guarded_regex import GuardedRegex

    patterns = [v for v in vars(rules).values() if isinstance(v, GuardedRegex)]
    patterns += [p for _, p, _ in rules.MENTIONS] + list(rules.EXCLUSIONS.values())
    patterns += [getattr(d, f) for d in rules.DESCRIPTORS for f in ("pattern", "negative")]
    assert sum(p.guard is not None for p in patterns) >= 20  # the guards are in use
    texts = [r["text"].lower() for r in _corpus()]
    for pattern in patterns:
        for text in texts:
            got = [m.span() for m in pattern.finditer(text)]
            assert got == [m.span() for m in pattern.regex.finditer(text)], (pattern.pattern, text)


def test_label_explain_cli_prints_why(tmp_path) -> None:
    from click.testing import CliRunner

    from cxrlite.cli import main

    source = tmp_path / "reports.txt"
    source.write_text(
        "No large pleural effusion or pneumothorax.\nPossible left lower lobe atelectasis.\n"
    )
    result = CliRunner().invoke(
        main, ["data", "label", str(source), "--out", str(tmp_path / "l.jsonl"), "--explain"]
    )
    assert result.exit_code == 0, result.output
    assert 'Pneumothorax: negative <- "pneumothorax" by negation (cue "no")' in result.output
    assert 'Atelectasis: uncertain <- "atelectasis" by hedge (cue "possible")' in result.output
    record = json.loads((tmp_path / "l.jsonl").read_text().splitlines()[1])
    assert record["decisions"][0]["scope"].startswith("possible left lower lobe")
