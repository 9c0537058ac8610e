"""Phantom reports: the labeler reads back exactly the CheXpert truth each report states."""

from __future__ import annotations

import random
import re

import pytest

from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    CORE_FINDINGS,
    DEVICES,
    EDEMA_SEVERITIES,
    EFFUSION_SIZES,
    LOBES,
    NEGATIVE,
    NOT_MENTIONED,
    PNEUMOTHORAX_SIZES,
    POSITIVE,
    SEXES,
    SIDES,
    UNCERTAIN,
    VIEWS,
    ZONES,
    Atelectasis,
    Consolidation,
    Edema,
    Effusion,
    Nodule,
    Pneumothorax,
    StudyLabels,
)
from cxrlite.eval.labeler import label_report
from cxrlite.phantoms.reports import chexpert_truth, write_report

SIDES_OR_BOTH = ("left", "right", "bilateral")
NORMAL_CTR = 0.44


def _study(**parts) -> StudyLabels:
    base = {"view": "PA", "sex": "F", "age": 55, "ctr": NORMAL_CTR}
    base.update(parts)
    return StudyLabels(**base)


def single_finding_studies() -> list[StudyLabels]:
    """Every finding alone, with each side, size, severity, lobe and zone; both views."""
    studies = [_study(view=view) for view in VIEWS]
    studies += [_study(view=v, ctr=ctr) for v in VIEWS for ctr in (0.52, 0.58, 0.66)]
    studies += [_study(effusion=Effusion(s, z)) for s in SIDES_OR_BOTH for z in EFFUSION_SIZES]
    studies += [_study(pneumothorax=Pneumothorax(s, z)) for s in SIDES for z in PNEUMOTHORAX_SIZES]
    studies += [_study(consolidation=Consolidation(lobe)) for lobe in LOBES]
    studies += [_study(nodule=Nodule(s, z, mm)) for s in SIDES for z in ZONES for mm in (6, 18, 45)]
    studies += [_study(edema=Edema(sev)) for sev in EDEMA_SEVERITIES]
    studies += [_study(atelectasis=Atelectasis(s)) for s in SIDES_OR_BOTH]
    studies += [_study(view="AP", devices=(d,)) for d in DEVICES]
    studies.append(_study(view="AP", devices=DEVICES))
    return studies


def random_study(rng: random.Random) -> StudyLabels:
    def maybe(p: float) -> bool:
        return rng.random() < p

    return StudyLabels(
        view=rng.choice(VIEWS),
        sex=rng.choice(SEXES),
        age=rng.randint(18, 95),
        ctr=rng.uniform(0.38, 0.68),
        effusion=Effusion(rng.choice(SIDES_OR_BOTH), rng.choice(EFFUSION_SIZES))
        if maybe(0.3)
        else None,
        pneumothorax=Pneumothorax(rng.choice(SIDES), rng.choice(PNEUMOTHORAX_SIZES))
        if maybe(0.25)
        else None,
        consolidation=Consolidation(rng.choice(LOBES)) if maybe(0.25) else None,
        nodule=Nodule(rng.choice(SIDES), rng.choice(ZONES), rng.randint(4, 60))
        if maybe(0.25)
        else None,
        edema=Edema(rng.choice(EDEMA_SEVERITIES)) if maybe(0.25) else None,
        atelectasis=Atelectasis(rng.choice(SIDES_OR_BOTH)) if maybe(0.25) else None,
        devices=tuple(d for d in DEVICES if maybe(0.25)),
    )


def _check(labels: StudyLabels, seed: int) -> tuple[str, str]:
    findings, impression = write_report(labels, random.Random(seed))
    truth = chexpert_truth(labels)
    # Both ways a report reaches the labeler: plain text and Study.report's section headers.
    text = (
        f"{findings} {impression}"
        if seed % 2
        else f"FINDINGS: {findings}\nIMPRESSION: {impression}"
    )
    got = label_report(text)
    assert got == truth, (text, {k: (got[k], truth[k]) for k in got if got[k] != truth[k]})
    # The findings paragraph alone states every core finding, as positive or negative.
    from_findings = label_report(findings)
    for name in CORE_FINDINGS:
        assert from_findings[name] == truth[name], (findings, name)
    return findings, impression


# What phantoms never show: no drawing (or report sentence) makes these positive.
NEVER_DRAWN = {"Enlarged Cardiomediastinum", "Fracture", "Pleural Other", "Pneumonia"}


def test_every_single_finding_reads_back_exactly() -> None:
    studies = single_finding_studies()
    for i, labels in enumerate(studies):
        for seed in range(15):
            _check(labels, 1000 * i + seed)
    # The studies above make every observation a phantom can show positive, each one at least once.
    positive = {
        obs
        for labels in studies
        for obs, value in chexpert_truth(labels).items()
        if value == POSITIVE
    }
    assert positive == set(CHEXPERT_OBSERVATIONS) - NEVER_DRAWN


def test_random_combinations_read_back_exactly() -> None:
    for seed in range(1500):
        rng = random.Random(seed)
        _check(random_study(rng), seed)


def test_truth_is_well_formed_and_never_uncertain() -> None:
    for seed in range(300):
        truth = chexpert_truth(random_study(random.Random(seed)))
        assert tuple(truth) == CHEXPERT_OBSERVATIONS
        assert UNCERTAIN not in truth.values()
        for name in CORE_FINDINGS:
            assert truth[name] in (POSITIVE, NEGATIVE)


def test_truth_of_normal_and_device_only_studies() -> None:
    normal = chexpert_truth(_study())
    assert normal["No Finding"] == POSITIVE
    assert normal["Lung Opacity"] == NEGATIVE
    assert normal["Enlarged Cardiomediastinum"] == NEGATIVE
    assert normal["Support Devices"] == NOT_MENTIONED
    devices = chexpert_truth(_study(devices=("pacemaker",)))
    assert devices["No Finding"] == POSITIVE and devices["Support Devices"] == POSITIVE
    edema = chexpert_truth(_study(edema=Edema("mild")))
    assert edema["No Finding"] == NOT_MENTIONED and edema["Lung Opacity"] == NOT_MENTIONED
    consolidation = chexpert_truth(_study(consolidation=Consolidation("lingula")))
    assert consolidation["Lung Opacity"] == POSITIVE


@pytest.mark.parametrize(
    "labels",
    [_study(), _study(view="AP", ctr=0.58, effusion=Effusion("left", "small"))],
    ids=["normal", "cardiomegaly+effusion"],
)
def test_wording_varies_across_seeds(labels: StudyLabels) -> None:
    reports = {write_report(labels, random.Random(seed)) for seed in range(200)}
    assert len({f for f, _ in reports}) >= 150
    assert len({i for _, i in reports}) >= 4


def test_same_seed_same_report() -> None:
    labels = random_study(random.Random(7))
    assert write_report(labels, random.Random(3)) == write_report(labels, random.Random(3))


def test_normal_impressions() -> None:
    for seed in range(50):
        for labels in (_study(), _study(view="AP", devices=DEVICES)):
            _, impression = write_report(labels, random.Random(seed))
            assert re.match(r"(No acute|No evidence of acute|Normal chest radiograph)", impression)


def test_laterality_size_and_position_are_written() -> None:
    for seed in range(30):
        rng = random.Random(seed)

        def findings_of(labels: StudyLabels, rng: random.Random = rng) -> str:
            return write_report(labels, rng)[0].lower()

        findings = findings_of(_study(effusion=Effusion("right", "moderate")))
        assert "right" in findings and "moderate" in findings
        findings = findings_of(_study(effusion=Effusion("bilateral", "large")))
        assert "bilateral" in findings and "large" in findings
        findings = findings_of(_study(pneumothorax=Pneumothorax("left", "small")))
        assert "left" in findings and "small" in findings
        findings = findings_of(_study(consolidation=Consolidation("right middle lobe")))
        assert "right middle lobe" in findings
        findings = findings_of(_study(consolidation=Consolidation("lingula")))
        assert "lingula" in findings
        findings = findings_of(_study(nodule=Nodule("left", "upper", 8)))
        assert "8 mm" in findings and "nodule" in findings and "left upper lung" in findings
        findings = findings_of(_study(nodule=Nodule("right", "lower", 45)))
        assert "4.5 cm" in findings and "mass" in findings and "nodule" not in findings
        findings = findings_of(_study(edema=Edema("severe")))
        assert "severe" in findings
        findings = findings_of(_study(atelectasis=Atelectasis("bilateral")))
        assert "bibasilar" in findings or "both lung bases" in findings
        findings = findings_of(_study(devices=("endotracheal tube",)))
        assert re.search(r"\d cm above the carina|standard position", findings)
