"""Phantom chest radiographs: sampled ground truth, rendering, and dataset generation.

No real radiographs can be downloaded here, so tests and the demo train on phantoms: frontal
(PA/AP) chest films drawn from a `StudyLabels`, with findings big enough to survive a 128 px
downscale. Image left = patient right (radiological convention); see `phantom_anatomy` for the
geometry and `phantom_findings` for where each finding is drawn.

Determinism: study i of seed s draws its labels, image, report and split from generators
derived from SeedSequence(s, spawn_key=(i, stream)), so it is identical whatever the number of
workers or the order of generation.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import random
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from cxrlite.data.labels import (
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
from cxrlite.fileio import atomic_write_bytes, write_json, write_jsonl
from cxrlite.imaging.write import png_bytes
from cxrlite.phantoms import findings as fnd
from cxrlite.phantoms.anatomy import (
    Frame,
    airways,
    aortic_knob_calcification,
    body_tissue,
    breasts,
    draw_clavicles_scapulae,
    draw_ribs,
    draw_vessels,
    gastric_bubble,
    lung_air,
    sample_anatomy,
    smooth_noise,
    soft,
    spine,
)
from cxrlite.phantoms.reports import chexpert_truth, write_report

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
# Normal and enlarged hearts are kept apart (no ctr in 0.475-0.53) so the label is unambiguous.
# Enlarged hearts come in three grades (the reports call ctr <= 0.55 mild, <= 0.60 moderate).
NORMAL_CTR = (0.36, 0.46)
ENLARGED_CTR_GRADES = ((0.53, 0.55), (0.55, 0.60), (0.60, 0.72))
ENLARGED_GRADE_WEIGHTS = (0.25, 0.4, 0.35)
AP_MAGNIFICATION = 1.04  # the heart is farther from the detector on an AP film
SPLIT_FRACTIONS = (("train", 0.8), ("validate", 0.1), ("test", 0.1))

_LABELS, _IMAGE, _REPORT, _SPLIT = range(4)  # per-study random streams
_FINDING_STREAMS = ("consolidation", "edema", "atelectasis", "nodule", "devices")


def study_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, stream)))


def study_id(seed: int, index: int) -> str:
    return f"phantom-s{seed}-{index:06d}"


# ---------------------------------------------------------------- ground truth sampling
def _pick(rng: np.random.Generator, options, weights) -> str:
    w = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def _side(rng, p_right=0.5) -> str:
    return "right" if rng.random() < p_right else "left"


def _effusion_side(rng, p_bilateral: float) -> str:
    return "bilateral" if rng.random() < p_bilateral else _side(rng, 0.6)


# A sick study gets one or two of these conditions; each produces correlated findings.
CONDITIONS = ("heart failure", "pneumonia", "pneumothorax", "neoplasm", "effusion", "collapse")
CONDITION_WEIGHTS = (0.27, 0.23, 0.22, 0.1, 0.1, 0.08)


def sample_labels(rng: np.random.Generator) -> StudyLabels:
    """Draw one study's truth with realistic demographics and co-occurrence.

    About 35% are normal; cardiomegaly, effusion, pneumothorax, consolidation and edema are each
    positive in roughly 15-30% of studies. AP (portable, inpatient/ICU) films are sicker and
    carry most of the support devices.
    """
    sex = "F" if rng.random() < 0.48 else "M"
    age = int(np.clip(rng.normal(60, 18), 18, 95))
    view = "AP" if rng.random() < 0.3 + 0.2 * (age > 70) else "PA"
    p_sick = (0.8 if view == "AP" else 0.56) + 0.1 * (age > 75) - 0.12 * (age < 35)
    found: dict[str, object] = {}
    cardiomegaly = False
    if rng.random() < p_sick:
        weights = np.array(CONDITION_WEIGHTS)
        if age < 40:  # primary spontaneous pneumothorax is a disease of the young
            weights[2] *= 2.0
        if age > 70:
            weights[0] *= 1.5
        conditions = {_pick(rng, CONDITIONS, weights)}
        if rng.random() < 0.3:
            conditions.add(_pick(rng, CONDITIONS, weights))
        for condition in sorted(conditions):
            cardiomegaly |= _add_condition(condition, rng, found)
        if rng.random() < 0.08 + 0.1 * (age > 70):
            cardiomegaly = True
    devices = _sample_devices(rng, view, age, bool(found) or cardiomegaly)
    if cardiomegaly:
        grade = int(rng.choice(3, p=ENLARGED_GRADE_WEIGHTS))
        ctr = rng.uniform(*ENLARGED_CTR_GRADES[grade])
    else:
        ctr = rng.uniform(*NORMAL_CTR)
    if view == "AP":
        ctr = min(ctr * AP_MAGNIFICATION, 0.475 if not cardiomegaly else 0.75)
    return StudyLabels(
        view=view, sex=sex, age=age, ctr=round(float(ctr), 3), devices=devices,
        **found,  # type: ignore[arg-type]
    )  # fmt: skip


def _add_condition(condition: str, rng: np.random.Generator, found: dict) -> bool:
    """Add one condition's findings to `found`; returns whether the heart is enlarged."""
    size = lambda: _pick(rng, ("small", "moderate", "large"), (0.45, 0.35, 0.2))  # noqa: E731
    cardiomegaly = False
    if condition == "heart failure":
        cardiomegaly = rng.random() < 0.8
        if rng.random() < 0.8:
            sev = _pick(rng, ("mild", "moderate", "severe"), (0.4, 0.4, 0.2))
            found["edema"] = Edema(sev)
        if rng.random() < 0.5:
            found.setdefault("effusion", Effusion(_effusion_side(rng, 0.65), size()))
        if rng.random() < 0.15:
            found.setdefault("atelectasis", Atelectasis("bilateral"))
    elif condition == "pneumonia":
        lobe = _pick(rng, LOBES, (0.15, 0.12, 0.28, 0.13, 0.08, 0.24))
        found["consolidation"] = Consolidation(lobe)
        if rng.random() < 0.25:
            side = "right" if lobe.startswith("right") else "left"
            found.setdefault("effusion", Effusion(side, _pick(rng, ("small", "moderate"), (2, 1))))
    elif condition == "pneumothorax":
        found["pneumothorax"] = Pneumothorax(
            _side(rng), "small" if rng.random() < 0.55 else "large"
        )
    elif condition == "neoplasm":
        mass = rng.random() < 0.45
        size_mm = int(rng.integers(30, 71) if mass else rng.integers(15, 30))
        zone = _pick(rng, ("upper", "mid", "lower"), (0.45, 0.3, 0.25))
        side = _side(rng, 0.55)
        found["nodule"] = Nodule(side, zone, size_mm)
        if rng.random() < 0.2:
            found.setdefault("effusion", Effusion(side, size()))
    elif condition == "effusion":
        side = _effusion_side(rng, 0.3)
        found["effusion"] = Effusion(side, size())
        if rng.random() < 0.4:
            found.setdefault("atelectasis", Atelectasis(side))
        cardiomegaly = rng.random() < 0.2
    else:  # collapse: postoperative / hypoventilation basilar atelectasis
        found["atelectasis"] = Atelectasis(_effusion_side(rng, 0.4))
        if rng.random() < 0.2:
            found.setdefault("effusion", Effusion("bilateral", "small"))
    return cardiomegaly


def _sample_devices(rng, view: str, age: int, sick: bool) -> tuple[str, ...]:
    if view == "AP":
        p = {"endotracheal tube": 0.25 + 0.15 * sick, "central venous catheter": 0.35 + 0.2 * sick}
    else:
        p = {"endotracheal tube": 0.0, "central venous catheter": 0.04}
    p["pacemaker"] = 0.03 + 0.08 * (age > 70) + 0.05 * (view == "AP")
    return tuple(d for d in ("endotracheal tube", "central venous catheter", "pacemaker")
                 if rng.random() < p[d])  # fmt: skip


# ---------------------------------------------------------------- rendering
def _sample_frame(labels: StudyLabels, rng: np.random.Generator, size: int) -> Frame:
    ap = labels.view == "AP"
    angle = math.radians(rng.uniform(-3, 3) * (1.6 if ap else 1.0))
    shift = (float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.03, 0.02)))
    return Frame(size, angle, shift, float(rng.uniform(0.94, 1.04)))


def _blur3(a: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 separable smoothing: softens stroke aliasing like a detector's blur."""
    b = a.copy()
    b[1:-1] = 0.5 * a[1:-1] + 0.25 * (a[:-2] + a[2:])
    c = b.copy()
    c[:, 1:-1] = 0.5 * b[:, 1:-1] + 0.25 * (b[:, :-2] + b[:, 2:])
    return c


def render_phantom(labels: StudyLabels, rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """Draw one frontal chest radiograph (uint8, size x size, bright = dense).

    Image left is the patient's right. The same labels and an identically seeded rng give
    identical pixels; `rng` is consumed (spawned from), as any generator use would.
    """
    if size < 32:
        raise ValueError(f"phantom size must be at least 32 pixels, got {size}")
    # Independent streams: adding or removing a finding leaves the anatomy, every other
    # finding and the film noise untouched (the tests compare images with and without one).
    anat_rng, finding_rng, film_rng = rng.spawn(3)
    f_rng = dict(zip(_FINDING_STREAMS, finding_rng.spawn(len(_FINDING_STREAMS)), strict=True))
    anat = sample_anatomy(labels, anat_rng)
    frame = _sample_frame(labels, anat_rng, size)
    X, Y = frame.X, frame.Y
    u, s, v = anat.lung_coords(X, Y)
    cavity_parts = anat.cavity_margin(X, Y)
    lung = soft(anat.lung_margin(X, Y, cavity_parts), 1.5 / size)
    heart = soft(anat.heart_margin(X, Y), 1.5 / size)
    cavity = soft(cavity_parts[0], 1.5 / size)
    cavity = np.maximum(cavity * soft(s - anat.med_w, 0.02), lung)
    layers = fnd.Layers(
        anat=anat, frame=frame, X=X, Y=Y, u=u, s=s, v=v, lung=lung, cavity=cavity,
        keep=np.ones_like(X), extra_air=np.zeros_like(X), vessel_keep=np.ones_like(X),
        dense=np.zeros_like(X),
    )  # fmt: skip
    if labels.effusion:
        fnd.draw_effusion(layers, labels.effusion)
    if labels.consolidation:
        fnd.draw_consolidation(layers, labels.consolidation, f_rng["consolidation"])
    if labels.edema:
        fnd.draw_edema(layers, labels.edema, f_rng["edema"])
    if labels.atelectasis:
        fnd.draw_atelectasis(layers, labels.atelectasis, f_rng["atelectasis"])
    if labels.nodule:
        fnd.draw_nodule(layers, labels.nodule, f_rng["nodule"])
    if labels.pneumothorax:
        fnd.draw_pneumothorax(layers, labels.pneumothorax)
    if labels.devices:
        fnd.draw_devices(layers, labels.devices, f_rng["devices"])

    air = lung_air(anat, X, Y, lung) + 0.12 * heart * cavity  # retrocardiac lung
    keep = layers.keep
    if labels.edema:
        vessels = draw_vessels(anat, frame, anat_rng, upper_boost=1.6, blur=0.009)
    else:
        vessels = draw_vessels(anat, frame, anat_rng)
    vessels *= lung * layers.vessel_keep * np.clip(0.3 + keep, 0.0, 1.0)
    bd = anat.bone_density
    bone = (
        0.2 * bd * draw_ribs(anat, frame) * (1.0 - 0.55 * soft(-anat.dome_margin(X, Y), 0.03))
        + 0.42 * bd * draw_clavicles_scapulae(anat, frame)
        + 0.09 * bd * spine(anat, frame, X, Y)
        + 0.4 * aortic_knob_calcification(anat, frame)
    )
    tissue = body_tissue(anat, X, Y) * (1.0 + 0.04 * smooth_noise(anat_rng, size, 6))
    atten = (
        tissue
        + breasts(anat, X, Y)
        - air * keep
        - layers.extra_air * lung
        - 0.35 * airways(anat, frame)
        - gastric_bubble(anat, X, Y)
        + 0.15 * vessels
        + bone
        + layers.dense
    )
    ap = labels.view == "AP"
    lo = film_rng.uniform(0.0, 0.1)
    hi = film_rng.uniform(1.25, 1.4) if ap else film_rng.uniform(1.3, 1.5)
    gamma = film_rng.uniform(0.85, 1.2)
    display = np.clip((_blur3(atten) - lo) / (hi - lo), 0.0, 1.0) ** gamma
    display = (1.0 - np.exp(-1.0 * display)) * (1.0 / (1.0 - math.exp(-1.0)))  # film shoulder
    noise = film_rng.uniform(0.015, 0.035) if ap else film_rng.uniform(0.008, 0.02)
    display = display + film_rng.normal(0.0, noise, display.shape).astype(np.float32)
    return (np.clip(display, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- dataset generation
def study_split(seed: int, index: int) -> str:
    """train / validate / test, about 80/10/10, fixed for a (seed, index)."""
    r = study_rng(seed, index, _SPLIT).random()
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if r < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


def _report_rng(seed: int, index: int) -> random.Random:
    state = np.random.SeedSequence(seed, spawn_key=(index, _REPORT)).generate_state(2)
    return random.Random(int(state[0]) << 32 | int(state[1]))


def make_phantom_study(seed: int, index: int, size: int = 256) -> tuple[Study, np.ndarray]:
    """Study `index` of `seed`: its record (image path relative to the output folder) and pixels."""
    labels = sample_labels(study_rng(seed, index, _LABELS))
    pixels = render_phantom(labels, study_rng(seed, index, _IMAGE), size)
    findings, impression = write_report(labels, _report_rng(seed, index))
    sid = study_id(seed, index)
    study = Study(
        id=sid, image=f"images/{sid}.png", split=study_split(seed, index), source="phantom",
        findings=findings, impression=impression, chexpert=chexpert_truth(labels),
        view=labels.view, sex=labels.sex, age=labels.age, labels=labels,
    )  # fmt: skip
    return study, pixels


def _write_one(index: int, seed: int, size: int, out_dir: str) -> Study:
    """Worker: render and write one image (module level so spawned processes can import it)."""
    study, pixels = make_phantom_study(seed, index, size)
    atomic_write_bytes(Path(out_dir) / study.image, png_bytes(pixels), fsync=False)
    return study


def generate_phantoms(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    size: int = 256,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[Study]:
    """Write n phantom studies: out_dir/images/<id>.png, manifest.jsonl and phantoms.json.

    The result does not depend on `workers`: study i is drawn from (seed, i) alone.
    progress(done, n) is called after each study.
    """
    if n < 0:
        raise ValueError(f"generate_phantoms: n must be >= 0, got {n}")
    if size < 32:
        raise ValueError(f"generate_phantoms: size must be at least 32 pixels, got {size}")
    if workers < 1:
        raise ValueError(f"generate_phantoms: workers must be >= 1, got {workers}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    job = partial(_write_one, seed=seed, size=size, out_dir=str(out))
    studies: list[Study] = []
    if workers == 1 or n < 2:
        results = map(job, range(n))
        studies = _collect(results, n, progress)
    else:
        # spawn: safe with threads (torch) in the parent and the same on every platform
        ctx = multiprocessing.get_context("spawn")
        chunk = max(1, min(64, n // (workers * 8)))
        with ctx.Pool(min(workers, n)) as pool:
            studies = _collect(pool.imap(job, range(n), chunksize=chunk), n, progress)
    write_jsonl(out / "manifest.jsonl", (s.to_dict() for s in studies))
    counts = {name: sum(s.split == name for s in studies) for name, _ in SPLIT_FRACTIONS}
    write_json(
        out / "phantoms.json",
        {
            "generator": "cxrlite.phantoms.generator",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "n": n,
            "size": size,
            "splits": counts,
        },
    )
    logger.info("wrote %d phantom studies (seed %d, %d px) to %s", n, seed, size, out)
    return studies


def _collect(results, n: int, progress) -> list[Study]:
    studies = []
    for study in results:
        studies.append(study)
        if progress is not None:
            progress(len(studies), n)
    return studies
