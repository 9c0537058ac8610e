"""Phantom radiographs: determinism, manifests, label statistics, and where findings are drawn.

Image left = patient right (radiological convention): a right-sided finding changes the left
half of the image.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    LOBES,
    Atelectasis,
    Consolidation,
    Edema,
    Effusion,
    Nodule,
    Pneumothorax,
    StudyLabels,
)
from cxrlite.data.records import Study
from cxrlite.fileio import read_jsonl
from cxrlite.phantoms.anatomy import Frame, sample_anatomy
from cxrlite.phantoms.generator import (
    generate_phantoms,
    render_phantom,
    sample_labels,
    study_rng,
    study_split,
)
from cxrlite.phantoms.sheet import caption, contact_sheet

SIZE = 128
BASE = StudyLabels(view="PA", sex="M", age=50, ctr=0.42)


def diff(change: dict, seed: int = 11, base: StudyLabels = BASE) -> np.ndarray:
    """Pixels with the change minus pixels without it, same random stream (int, -255..255)."""
    with_it = dataclasses.replace(base, **change)
    a = render_phantom(base, np.random.default_rng(seed), SIZE).astype(np.int32)
    b = render_phantom(with_it, np.random.default_rng(seed), SIZE).astype(np.int32)
    return b - a


def region(d: np.ndarray, x0: float, x1: float, y0: float, y1: float) -> float:
    """Mean of d over a box given as fractions of the image (x to the image right, y down)."""
    h, w = d.shape
    return float(d[int(y0 * h) : int(y1 * h), int(x0 * w) : int(x1 * w)].mean())


# ---------------------------------------------------------------- determinism and outputs
def test_render_is_deterministic_and_seed_dependent() -> None:
    labels = sample_labels(study_rng(5, 1, 0))
    a = render_phantom(labels, study_rng(5, 1, 1), SIZE)
    b = render_phantom(labels, study_rng(5, 1, 1), SIZE)
    c = render_phantom(labels, study_rng(5, 2, 1), SIZE)
    assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 2.0


def test_render_looks_like_a_radiograph() -> None:
    img = render_phantom(BASE, np.random.default_rng(0), SIZE).astype(float)
    lungs = (region(img, 0.2, 0.35, 0.3, 0.55) + region(img, 0.65, 0.8, 0.3, 0.55)) / 2
    abdomen = region(img, 0.3, 0.7, 0.9, 1.0)
    outside = region(img, 0.0, 0.04, 0.5, 0.9)  # air beside the chest wall
    assert outside < 40 < lungs < abdomen - 50  # air dark, lungs darker than the abdomen


def test_generate_writes_manifest_that_round_trips(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    studies = generate_phantoms(
        tmp_path, 5, seed=3, size=64, progress=lambda d, n: calls.append((d, n))
    )
    assert calls == [(i, 5) for i in range(1, 6)]
    rows = read_jsonl(tmp_path / "manifest.jsonl")
    loaded = [Study.from_dict(r) for r in rows]
    assert loaded == studies
    for s in loaded:
        assert s.source == "phantom" and not Path(s.image).is_absolute()
        assert s.image == f"images/{s.id}.png"
        with Image.open(tmp_path / s.image) as im:
            assert im.size == (64, 64) and im.mode == "L"
        assert (s.view, s.sex, s.age) == (s.labels.view, s.labels.sex, s.labels.age)
        assert set(s.chexpert) == set(CHEXPERT_OBSERVATIONS)
        assert s.findings and s.impression
    meta = json.loads((tmp_path / "phantoms.json").read_text())
    assert (meta["seed"], meta["n"], meta["size"]) == (3, 5, 64)
    assert sum(meta["splits"].values()) == 5 and meta["version"]


def test_workers_do_not_change_the_result(tmp_path: Path) -> None:
    one = generate_phantoms(tmp_path / "one", 6, seed=9, size=64, workers=1)
    two = generate_phantoms(tmp_path / "two", 6, seed=9, size=64, workers=2)
    assert one == two
    for s in one:
        a = (tmp_path / "one" / s.image).read_bytes()
        assert a == (tmp_path / "two" / s.image).read_bytes()
    # study i does not depend on how many studies are made
    assert generate_phantoms(tmp_path / "three", 3, seed=9, size=64) == one[:3]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="size"):
        render_phantom(BASE, np.random.default_rng(0), 16)
    with pytest.raises(ValueError, match="n must be"):
        generate_phantoms("/nonexistent-never-written", -1)


def test_split_proportions() -> None:
    splits = [study_split(0, i) for i in range(4000)]
    share = {name: splits.count(name) / len(splits) for name in ("train", "validate", "test")}
    assert 0.77 < share["train"] < 0.83
    assert 0.08 < share["validate"] < 0.12 and 0.08 < share["test"] < 0.12
    assert study_split(0, 17) == study_split(0, 17)


# ---------------------------------------------------------------- label statistics
def test_sample_labels_prevalence_and_co_occurrence() -> None:
    labels = [sample_labels(study_rng(123, i, 0)) for i in range(600)]

    def share(pred) -> float:
        return sum(map(pred, labels)) / len(labels)

    assert 0.28 <= share(lambda x: x.is_normal) <= 0.45
    for name, pred in {
        "cardiomegaly": lambda x: x.cardiomegaly,
        "effusion": lambda x: x.effusion is not None,
        "pneumothorax": lambda x: x.pneumothorax is not None,
        "consolidation": lambda x: x.consolidation is not None,
        "edema": lambda x: x.edema is not None,
    }.items():
        assert 0.13 <= share(pred) <= 0.32, name
    edema = [x for x in labels if x.edema]
    assert sum(x.cardiomegaly for x in edema) / len(edema) > 0.6
    ap = [x for x in labels if x.view == "AP"]
    pa = [x for x in labels if x.view == "PA"]
    assert 0.2 < len(ap) / len(labels) < 0.5
    assert sum(bool(x.devices) for x in ap) / len(ap) > 3 * sum(bool(x.devices) for x in pa) / len(
        pa
    )
    assert {x.sex for x in labels} == {"F", "M"} and all(18 <= x.age <= 95 for x in labels)
    # no ambiguous hearts: the normal and enlarged ctr ranges are kept apart
    assert not [x.ctr for x in labels if 0.475 < x.ctr < 0.53]
    # AP magnification: normal AP hearts are drawn larger than normal PA hearts on average
    mean_ctr = lambda xs: np.mean([x.ctr for x in xs if not x.cardiomegaly])  # noqa: E731
    assert mean_ctr(ap) > mean_ctr(pa) * 1.02


# ---------------------------------------------------------------- findings in the right place
def test_heart_is_drawn_at_the_labelled_ratio() -> None:
    for view in ("PA", "AP"):
        labels = dataclasses.replace(BASE, view=view, ctr=0.61)
        anat = sample_anatomy(labels, np.random.default_rng(4))
        right_x, left_x, _, _ = anat.heart_extent()
        assert (left_x - right_x) / (2 * anat.hw) == pytest.approx(0.61)
        # measured on a pixel grid as a radiologist does: right-most plus left-most extent from
        # the midline (the two extremes lie at different heights), over the inner chest width
        frame = Frame(512, 0.0, (0.0, 0.0), 1.0)
        columns = np.nonzero((anat.heart_margin(frame.X, frame.Y) > 0).any(axis=0))[0]
        width = (columns.max() - columns.min() + 1) / 512
        assert width / (2 * anat.hw) == pytest.approx(0.61, abs=0.01)
    d = diff({"ctr": 0.62})  # the heart grows to both sides, more to the patient's left
    right_border = region(d, 0.2, 0.42, 0.45, 0.75)
    left_border = region(d, 0.6, 0.85, 0.45, 0.75)
    assert left_border > right_border > 3


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_brightens_its_own_base(side: str) -> None:
    d = diff({"effusion": Effusion(side, "moderate")})
    own, other = ((0.55, 0.95), (0.05, 0.45)) if side == "left" else ((0.05, 0.45), (0.55, 0.95))
    assert region(d, *own, 0.5, 0.8) > 25
    assert region(d, *other, 0.0, 1.0) == 0
    assert region(d, *own, 0.1, 0.3) < 2  # fluid layers at the base, not at the apex


def test_effusion_sizes_rise_in_height() -> None:
    heights = []
    for size in ("small", "moderate", "large"):
        d = diff({"effusion": Effusion("right", size)})
        rows = np.nonzero((d[:, : SIZE // 2] > 30).sum(axis=1) > 3)[0]
        heights.append(SIZE - rows.min())
    assert heights[0] + 8 < heights[1] and heights[1] + 8 < heights[2]
    d = diff({"effusion": Effusion("bilateral", "small")})
    assert region(d, 0.05, 0.45, 0.5, 0.85) > 5 and region(d, 0.55, 0.95, 0.5, 0.85) > 5


@pytest.mark.parametrize("side", ["left", "right"])
def test_pneumothorax_darkens_the_apex_and_lateral_wall(side: str) -> None:
    small = diff({"pneumothorax": Pneumothorax(side, "small")})
    large = diff({"pneumothorax": Pneumothorax(side, "large")})
    lateral = (0.55, 0.95) if side == "left" else (0.05, 0.45)
    other = (0.05, 0.45) if side == "left" else (0.55, 0.95)
    assert region(small, *lateral, 0.1, 0.6) < -2
    assert region(large, *lateral, 0.1, 0.6) < 1.5 * region(small, *lateral, 0.1, 0.6)
    assert region(small, *other, 0.0, 1.0) == 0 and region(large, *other, 0.0, 1.0) == 0
    assert (small > 15).sum() > 10  # the bright visceral pleural line


@pytest.mark.parametrize("lobe", LOBES)
def test_consolidation_opacifies_its_lobe(lobe: str) -> None:
    d = diff({"consolidation": Consolidation(lobe)})
    own, other = (
        ((0.05, 0.5), (0.5, 0.95)) if lobe.startswith("right") else ((0.5, 0.95), (0.05, 0.5))
    )
    upper, lower = region(d, *own, 0.1, 0.4), region(d, *own, 0.5, 0.8)
    assert max(upper, lower) > 12
    assert region(d, *other, 0.0, 1.0) == 0
    if "upper" in lobe:
        assert upper > 2 * lower
    else:
        assert lower > 2 * upper


@pytest.mark.parametrize(("side", "zone"), [("right", "upper"), ("left", "lower"), ("left", "mid")])
def test_nodule_is_in_its_hemithorax_and_zone(side: str, zone: str) -> None:
    d = diff({"nodule": Nodule(side, zone, 20)})
    y, x = np.unravel_index(np.argmax(d), d.shape)
    assert d[y, x] > 40
    assert (x < SIZE / 2) == (side == "right")
    v = y / SIZE
    assert {"upper": 0.15 < v < 0.42, "mid": 0.35 < v < 0.6, "lower": 0.5 < v < 0.8}[zone]
    mass = diff({"nodule": Nodule(side, zone, 50)})
    assert (mass > 30).sum() > 3 * (d > 30).sum()


def test_edema_is_bilateral_and_grows_with_severity() -> None:
    means = []
    for severity in ("mild", "moderate", "severe"):
        d = diff({"edema": Edema(severity)})
        left, right = region(d, 0.1, 0.45, 0.3, 0.75), region(d, 0.55, 0.9, 0.3, 0.75)
        assert left > 5 and right > 5 and 0.5 < left / right < 2
        means.append(left + right)
    assert means[0] < means[1] < means[2]


@pytest.mark.parametrize("side", ["left", "right"])
def test_atelectasis_is_basal_on_its_side(side: str) -> None:
    d = diff({"atelectasis": Atelectasis(side)})
    own, other = ((0.55, 0.95), (0.05, 0.45)) if side == "left" else ((0.05, 0.45), (0.55, 0.95))
    assert region(d, *own, 0.5, 0.8) > 4
    assert region(d, *own, 0.5, 0.8) > 4 * abs(region(d, *own, 0.05, 0.35))
    # the heart rides on the left dome, so left volume loss may nudge it a little
    assert abs(region(d, *other, 0.0, 1.0)) < 0.2


def test_devices_are_radiopaque() -> None:
    ett = diff({"devices": ("endotracheal tube",)})
    assert region(ett, 0.42, 0.58, 0.0, 0.2) > 10  # in the trachea, midline neck
    assert region(ett, 0.0, 0.3, 0.0, 1.0) == region(ett, 0.7, 1.0, 0.0, 1.0) == 0
    pm = diff({"devices": ("pacemaker",)})
    assert pm.max() > 80 and region(pm, 0.55, 1.0, 0.05, 0.4) > 3 * abs(
        region(pm, 0.0, 0.4, 0.05, 0.4)
    )


# ---------------------------------------------------------------- contact sheet
def test_contact_sheet(tmp_path: Path) -> None:
    studies = generate_phantoms(tmp_path / "p", 4, seed=1, size=64)
    out = contact_sheet(studies, tmp_path / "p", tmp_path / "sheet.png", cols=3, tile=96)
    with Image.open(out) as im:
        assert im.width == 3 * 96 and im.height > 2 * 96
    labelled = dataclasses.replace(
        studies[0],
        labels=dataclasses.replace(BASE, ctr=0.6, effusion=Effusion("left", "small")),
        view="PA", sex="M", age=50,
    )  # fmt: skip
    text = caption(labelled)
    assert text.startswith("PA M/50") and "effusion L small" in text and "cardiomegaly" in text
    missing = dataclasses.replace(studies[0], image="images/none.png")
    with pytest.raises(ValueError, match="none.png"):
        contact_sheet([missing], tmp_path / "p", tmp_path / "bad.png")
