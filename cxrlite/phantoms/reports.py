"""Radiology-style reports written from a phantom study's labels, and the CheXpert truth they state.

`write_report` turns `StudyLabels` into a FINDINGS paragraph and an IMPRESSION, MIMIC-CXR style,
with varied wording and sentence order. `chexpert_truth` gives the 14 CheXpert observations
exactly as every such report states them, independent of the wording drawn:

- the five core findings (Cardiomegaly, Pleural Effusion, Pneumothorax, Consolidation, Edema)
  are always stated, so they are always positive or negative;
- Enlarged Cardiomediastinum is always negative: the phantom draws no widened mediastinum and
  every report says the mediastinal contours (or cardiomediastinal silhouette) are normal;
- Lung Opacity is positive with consolidation (its sentences always say "opacity"), negative
  when the report says the lungs are (otherwise) clear, which it always does unless there is
  consolidation or edema, and not mentioned for edema without consolidation;
- Lung Lesion positive iff a nodule/mass; Atelectasis and Support Devices positive or not
  mentioned; Pneumonia, Pleural Other and Fracture are never mentioned (no uncertainty, no
  "no fracture" statement);
- No Finding positive iff the study has no pathology (devices do not count), else not
  mentioned, which is what the CheXpert rule gives from the labels above.

`cxrlite.eval.labeler.label_report(findings + " " + impression)` returns `chexpert_truth`
exactly; tests/test_reports.py holds that for thousands of label combinations.
"""

from __future__ import annotations

import random

from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    StudyLabels,
)

# Cardiothoracic-ratio cut points for the severity word (0.5 is the cardiomegaly threshold).
_CARDIOMEGALY_GRADES = ((0.55, "mild"), (0.60, "moderate"), (9.9, "severe"))


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _join(items: list[str], rng: random.Random) -> str:
    """ "a", "a or b", "a, b, or c" (Oxford comma drawn at random, as radiologists vary)."""
    if len(items) == 1:
        return items[0]
    if len(items) == 2:
        return f"{items[0]} or {items[1]}"
    comma = "," if rng.random() < 0.5 else ""
    return f"{', '.join(items[:-1])}{comma} or {items[-1]}"


def _lobe_adj(lobe: str) -> str:
    return "lingular" if lobe == "lingula" else lobe


def _lobe_in(lobe: str) -> str:
    return f"the {lobe}"


def _cardiomegaly_grade(ctr: float) -> str:
    return next(word for limit, word in _CARDIOMEGALY_GRADES if ctr <= limit)


def _size_text(size_mm: int, is_mass: bool, rng: random.Random) -> str:
    if size_mm < 10 or (not is_mass and rng.random() < 0.5):
        return f"{size_mm} mm"
    return f"{size_mm / 10:g} cm"


# ---- view ----------------------------------------------------------------------------------


def _view_sentence(labels: StudyLabels, rng: random.Random) -> list[str]:
    if rng.random() < 0.45:
        return []
    if labels.view == "AP":
        options = [
            "Portable AP view of the chest.",
            "Single portable AP upright view of the chest.",
            "AP portable chest radiograph.",
            "Portable semi-upright AP radiograph of the chest.",
        ]
    else:
        options = [
            "PA and lateral views of the chest.",
            "Frontal and lateral views of the chest were obtained.",
            "PA and lateral chest radiographs.",
        ]
    return [rng.choice(options)]


# ---- support devices -----------------------------------------------------------------------


def _device_sentence(device: str, rng: random.Random) -> str:
    if device == "endotracheal tube":
        cm = rng.randint(3, 6)
        return rng.choice(
            [
                f"Endotracheal tube terminates {cm} cm above the carina.",
                f"An endotracheal tube is in place with its tip {cm} cm above the carina.",
                f"ET tube tip is {cm} cm above the carina.",
                "The endotracheal tube is in standard position.",
            ]
        )
    if device == "central venous catheter":
        # The access side and tip level are not in StudyLabels, so the drawing cannot follow the
        # text: state only what the phantom shows everywhere (a central line ending in the SVC).
        tip = rng.choice(["the SVC", "the mid SVC", "the superior vena cava"])
        return rng.choice(
            [
                f"Central venous catheter terminates in {tip}.",
                f"A central line is present with its tip in {tip}.",
                f"Central catheter tip projects over {tip}.",
            ]
        )
    return rng.choice(  # phantoms draw a left chest wall, dual-lead device
        [
            "Left-sided pacemaker with leads terminating in the right atrium and right ventricle.",
            "A dual-chamber pacemaker is in place with leads in expected position.",
            "Left chest wall pacemaker device with leads in standard position.",
        ]
    )


# ---- heart and mediastinum -----------------------------------------------------------------


def _heart_sentences(labels: StudyLabels, rng: random.Random) -> list[str]:
    mediastinum = rng.choice(
        [
            "The mediastinal contours are normal.",
            "Mediastinal and hilar contours are unremarkable.",
            "The mediastinum is not widened.",
            "Hilar and mediastinal contours are within normal limits.",
        ]
    )
    if not labels.cardiomegaly:
        combined = [
            "The cardiomediastinal silhouette is normal.",
            "Normal cardiomediastinal silhouette.",
            "Heart size and mediastinal contours are normal.",
            "The cardiac and mediastinal silhouettes are unremarkable.",
            "Cardiomediastinal and hilar contours are within normal limits.",
        ]
        heart = [
            "The heart size is normal.",
            "Heart size is normal.",
            "Normal heart size.",
            "The cardiac silhouette is normal in size.",
            "The heart is not enlarged.",
            "Heart size is within normal limits.",
        ]
        if rng.random() < 0.4:
            return [rng.choice(combined)]
        return [rng.choice(heart), mediastinum]
    grade = _cardiomegaly_grade(labels.ctr)
    adverb = {"mild": "mildly", "moderate": "moderately", "severe": "severely"}[grade]
    heart = rng.choice(
        [
            f"{_cap(grade)} cardiomegaly.",
            f"There is {grade} cardiomegaly.",
            f"The heart is {adverb} enlarged.",
            f"{_cap(grade)} enlargement of the cardiac silhouette.",
            f"The cardiac silhouette is {adverb} enlarged.",
            "The heart is enlarged.",
            "Cardiomegaly is present.",
        ]
    )
    if rng.random() < 0.25:
        return [f"{_cap(grade)} cardiomegaly with normal mediastinal contours."]
    return [heart, mediastinum]


# ---- lungs ---------------------------------------------------------------------------------


def _consolidation_sentence(lobe: str, rng: random.Random) -> str:
    # Every wording says "opacity": chexpert_truth counts consolidation as a Lung Opacity.
    adj, where = _lobe_adj(lobe), _lobe_in(lobe)
    return rng.choice(
        [
            f"{_cap(adj)} opacity consistent with consolidation.",
            f"There is consolidative opacity in {where}.",
            f"Focal opacity in {where} consistent with consolidation.",
            f"Airspace opacity in {where} represents consolidation.",
            f"Dense {adj} opacity compatible with consolidation.",
        ]
    )


def _edema_sentence(severity: str, rng: random.Random) -> str:
    # No "opacity" here: edema without consolidation leaves Lung Opacity not mentioned.
    options = [
        f"{_cap(severity)} pulmonary edema.",
        f"There is {severity} pulmonary edema.",
        f"{_cap(severity)} pulmonary edema is present.",
        f"Findings are consistent with {severity} pulmonary edema.",
    ]
    if severity == "mild":
        options += [
            "Mild interstitial pulmonary edema.",
            "Mild pulmonary vascular congestion and interstitial edema.",
        ]
    else:
        options.append(f"There is {severity} bilateral interstitial and alveolar edema.")
    return rng.choice(options)


def _atelectasis_sentence(side: str, rng: random.Random) -> str:
    if side == "bilateral":
        where, base = "bibasilar", "both lung bases"
    else:
        where, base = f"{side} basilar", f"the {side} lung base"
    return rng.choice(
        [
            f"{_cap(where)} atelectasis.",
            f"Mild {where} atelectasis.",
            f"There is {where} atelectasis.",
            f"Linear atelectasis at {base}.",
            f"Subsegmental atelectasis at {base}.",
            f"Minimal {where} atelectasis.",
        ]
    )


def _nodule_sentence(labels: StudyLabels, rng: random.Random) -> str:
    nodule = labels.nodule
    assert nodule is not None
    size = _size_text(nodule.size_mm, nodule.is_mass, rng)
    place = f"{nodule.side} {nodule.zone} lung"
    loc = rng.choice([f"the {place}", f"the {place} zone"])
    if nodule.is_mass:
        return rng.choice(
            [
                f"There is a {size} mass in {loc}.",
                f"A {size} {place} mass is seen.",
                f"{_cap(size)} mass projects over {loc}.",
                f"Large {size} rounded mass in {loc}.",
            ]
        )
    return rng.choice(
        [
            f"There is a {size} nodule in {loc}.",
            f"A {size} {place} nodule is noted.",
            f"{_cap(size)} well-circumscribed nodule projects over {loc}.",
            f"A rounded {size} nodule is seen in {loc}.",
        ]
    )


def _clear_lungs_sentence(labels: StudyLabels, rng: random.Random) -> str | None:
    if labels.consolidation or labels.edema:
        return None
    if labels.atelectasis or labels.nodule:
        return rng.choice(["The lungs are otherwise clear.", "Lungs are otherwise clear."])
    return rng.choice(
        [
            "The lungs are clear.",
            "Lungs are clear.",
            "The lungs are well expanded and clear.",
            "Clear lungs.",
        ]
    )


# ---- pleura --------------------------------------------------------------------------------


def _effusion_phrase(side: str, size: str, rng: random.Random) -> str:
    if side == "bilateral":
        return rng.choice(
            [f"{size} bilateral pleural effusions", f"{size} pleural effusions bilaterally"]
        )
    return rng.choice(
        [
            f"{size} {side} pleural effusion",
            f"{size} {side}-sided pleural effusion",
            f"{size} {side} effusion",
        ]
    )


def _effusion_sentence(side: str, size: str, rng: random.Random) -> str:
    phrase = _effusion_phrase(side, size, rng)
    if side != "bilateral" and size == "small" and rng.random() < 0.25:
        return f"Blunting of the {side} costophrenic angle reflects a small pleural effusion."
    return rng.choice(
        [f"{_cap(phrase)}.", f"There is a {phrase}.", f"A {phrase} is present."]
        if side != "bilateral"
        else [f"{_cap(phrase)}.", f"There are {phrase}."]
    )


def _pneumothorax_phrase(side: str, size: str, rng: random.Random) -> str:
    return rng.choice(
        [
            f"{size} {side} pneumothorax",
            f"{size} {side} apical pneumothorax",
            f"{size} {side}-sided pneumothorax",
        ]
    )


def _pneumothorax_sentence(side: str, size: str, rng: random.Random) -> str:
    phrase = _pneumothorax_phrase(side, size, rng)
    return rng.choice([f"{_cap(phrase)}.", f"There is a {phrase}.", f"A {phrase} is present."])


# ---- negatives -----------------------------------------------------------------------------

_NEGATIVE_NOUNS = {
    "consolidation": ["focal consolidation", "consolidation", "focal airspace consolidation"],
    "effusion": ["pleural effusion", "effusion"],
    "pneumothorax": ["pneumothorax"],
    "edema": ["pulmonary edema", "edema"],
}
_NEGATION_TEMPLATES = [
    "No {}.",
    "There is no {}.",
    "No evidence of {}.",
    "No {} is seen.",
    "There is no evidence of {}.",
    "No {} is identified.",
]


def _negative_sentences(absent: list[str], rng: random.Random) -> list[str]:
    """Group the absent core findings into one to three "No ..." sentences."""
    groups: list[list[str]] = []
    for name in absent:
        if groups and rng.random() < 0.6:
            groups[-1].append(name)
        else:
            groups.append([name])
    sentences = []
    for group in groups:
        nouns = [rng.choice(_NEGATIVE_NOUNS[name]) for name in group]
        sentences.append(_cap(rng.choice(_NEGATION_TEMPLATES).format(_join(nouns, rng))))
    return sentences


# ---- assembling ----------------------------------------------------------------------------


def _lung_and_pleura_sentences(labels: StudyLabels, rng: random.Random) -> list[str]:
    positives: list[str] = []
    if labels.consolidation:
        positives.append(_consolidation_sentence(labels.consolidation.lobe, rng))
    if labels.edema:
        positives.append(_edema_sentence(labels.edema.severity, rng))
    if labels.nodule:
        positives.append(_nodule_sentence(labels, rng))
    if labels.atelectasis:
        positives.append(_atelectasis_sentence(labels.atelectasis.side, rng))
    pleural: list[str] = []
    absent = []
    if not labels.consolidation:
        absent.append("consolidation")
    if not labels.edema:
        absent.append("edema")
    eff, ptx = labels.effusion, labels.pneumothorax
    # A single pleural positive often carries the other pleural negative: "... without pneumothorax."
    if eff and not ptx and rng.random() < 0.35:
        phrase = _effusion_phrase(eff.side, eff.size, rng)
        pleural.append(f"{_cap(phrase)} without pneumothorax.")
    elif ptx and not eff and rng.random() < 0.35:
        phrase = _pneumothorax_phrase(ptx.side, ptx.size, rng)
        tail = rng.choice([" without pleural effusion.", ", but no pleural effusion."])
        pleural.append(f"{_cap(phrase)}{tail}")
    else:
        if eff:
            pleural.append(_effusion_sentence(eff.side, eff.size, rng))
        else:
            absent.append("effusion")
        if ptx:
            pleural.append(_pneumothorax_sentence(ptx.side, ptx.size, rng))
        else:
            absent.append("pneumothorax")
    if rng.random() < 0.5:
        rng.shuffle(absent)
    negatives = _negative_sentences(absent, rng) if absent else []
    clear = _clear_lungs_sentence(labels, rng)
    lungs = positives + ([clear] if clear else [])
    if rng.random() < 0.5:
        return lungs + pleural + negatives
    return positives + pleural + negatives + ([clear] if clear else [])


_NORMAL_IMPRESSIONS = (
    "No acute cardiopulmonary process.",
    "No acute cardiopulmonary abnormality.",
    "No acute intrathoracic process.",
    "No evidence of acute cardiopulmonary disease.",
)
_BONES = (
    "No acute osseous abnormality.",
    "The visualized osseous structures are unremarkable.",
    "Osseous structures are intact.",
)


def _impression_items(labels: StudyLabels, rng: random.Random) -> list[str]:
    """Positive findings, most urgent first, each as a short noun phrase."""
    items: list[str] = []
    if labels.pneumothorax:
        p = labels.pneumothorax
        items.append(
            rng.choice([f"{p.size} {p.side} pneumothorax", f"{p.side} pneumothorax, {p.size}"])
        )
    if labels.consolidation:
        items.append(f"{_lobe_adj(labels.consolidation.lobe)} consolidation")
    if labels.edema:
        items.append(f"{labels.edema.severity} pulmonary edema")
    if labels.effusion:
        items.append(_effusion_phrase(labels.effusion.side, labels.effusion.size, rng))
    if labels.nodule:
        n = labels.nodule
        size = _size_text(n.size_mm, n.is_mass, rng)
        kind = "mass" if n.is_mass else "nodule"
        items.append(
            f"{size} {n.side} {n.zone} lung {kind}; recommend chest CT for further evaluation"
        )
    if labels.cardiomegaly:
        items.append(
            rng.choice([f"{_cardiomegaly_grade(labels.ctr)} cardiomegaly", "cardiomegaly"])
        )
    if labels.atelectasis:
        side = labels.atelectasis.side
        items.append(
            "bibasilar atelectasis" if side == "bilateral" else f"{side} basilar atelectasis"
        )
    return [_cap(item) for item in items]


def _impression(labels: StudyLabels, rng: random.Random) -> str:
    items = _impression_items(labels, rng)
    if not items:
        options = list(_NORMAL_IMPRESSIONS)
        if not labels.devices:
            options.append("Normal chest radiograph.")
        normal = rng.choice(options)
        if labels.devices and rng.random() < 0.3:
            return f"{normal} Support devices in standard position."
        return normal
    if len(items) > 1 and rng.random() < 0.5:
        return " ".join(f"{i}. {item}." for i, item in enumerate(items, start=1))
    return " ".join(f"{item}." for item in items)


def write_report(labels: StudyLabels, rng: random.Random) -> tuple[str, str]:
    """(findings, impression) for one phantom study, worded at random from `rng`."""
    devices = [_device_sentence(d, rng) for d in labels.devices]
    heart = _heart_sentences(labels, rng)
    chest = _lung_and_pleura_sentences(labels, rng)
    bones = [rng.choice(_BONES)] if rng.random() < 0.4 else []
    # ICU films tend to open with the lines and tubes; otherwise heart or lungs come first.
    orders = [
        devices + heart + chest,
        devices + chest + heart,
        heart + chest + devices,
        chest + heart + devices,
    ]
    body = rng.choice(orders)
    findings = " ".join(_view_sentence(labels, rng) + body + bones)
    return findings, _impression(labels, rng)


def chexpert_truth(labels: StudyLabels) -> dict[str, str]:
    """The 14 CheXpert observations as every `write_report` text states them (see module doc)."""

    def pos_neg(present: object) -> str:
        return POSITIVE if present else NEGATIVE

    def pos_or_unmentioned(present: object) -> str:
        return POSITIVE if present else NOT_MENTIONED

    if labels.consolidation:
        opacity = POSITIVE
    elif labels.edema:
        opacity = NOT_MENTIONED
    else:
        opacity = NEGATIVE
    truth = {
        "No Finding": pos_or_unmentioned(labels.is_normal),
        "Enlarged Cardiomediastinum": NEGATIVE,
        "Cardiomegaly": pos_neg(labels.cardiomegaly),
        "Lung Opacity": opacity,
        "Lung Lesion": pos_or_unmentioned(labels.nodule),
        "Edema": pos_neg(labels.edema),
        "Consolidation": pos_neg(labels.consolidation),
        "Pneumonia": NOT_MENTIONED,
        "Atelectasis": pos_or_unmentioned(labels.atelectasis),
        "Pneumothorax": pos_neg(labels.pneumothorax),
        "Pleural Effusion": pos_neg(labels.effusion),
        "Pleural Other": NOT_MENTIONED,
        "Fracture": NOT_MENTIONED,
        "Support Devices": pos_or_unmentioned(labels.devices),
    }
    assert tuple(truth) == CHEXPERT_OBSERVATIONS
    return truth
