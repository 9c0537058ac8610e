"""PadChest: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]`` with images at
``<ImageDir>/<ImageID>``; its labels mapped to CheXpert observations, no English reports.
Splits hash PatientID."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, NEGATIVE, NOT_MENTIONED, POSITIVE
from cxrlite.data.layouts.common import (
    FRONTAL_VIEWS,
    PATHOLOGIES,
    SEXES,
    DatasetError,
    find_table,
    finish,
    image_exists,
    int_or_none,
    patient_split,
    read_csv,
)
from cxrlite.data.records import Study

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PADCHEST_CSV_GLOB = "PADCHEST_chest_x_ray_images_labels_160K*.csv*"
# CheXpert observation -> the PadChest labels that mean it. Labels not listed (e.g. "aortic
# elongation", "scoliosis") have no CheXpert counterpart and are ignored.
_PADCHEST_GROUPS: dict[str, tuple[str, ...]] = {
    "No Finding": ("normal",),
    "Cardiomegaly": ("cardiomegaly",),
    "Enlarged Cardiomediastinum": ("mediastinal enlargement", "superior mediastinal enlargement"),
    "Lung Opacity": (
        "infiltrates", "interstitial pattern", "reticular interstitial pattern",
        "reticulonodular interstitial pattern", "ground glass pattern", "alveolar pattern",
        "increased density",
    ),
    "Lung Lesion": (
        "nodule", "multiple nodules", "mass", "pulmonary mass", "lung metastasis", "cavitation",
    ),
    "Edema": ("pulmonary edema",),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Atelectasis": (
        "atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
        "round atelectasis", "total atelectasis", "atelectasis basal",
    ),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Pleural Effusion": (
        "pleural effusion", "loculated pleural effusion", "loculated fissural effusion",
        "hydropneumothorax", "hemothorax", "costophrenic angle blunting",
    ),
    "Pleural Other": (
        "pleural thickening", "apical pleural thickening", "calcified pleural thickening",
        "pleural plaques", "calcified pleural plaques",
    ),
    "Fracture": (
        "fracture", "rib fracture", "callus rib fracture", "clavicle fracture",
        "humeral fracture", "vertebral fracture", "vertebral compression",
    ),
    "Support Devices": (
        "pacemaker", "dual chamber device", "single chamber device", "electrical device",
        "nsg tube", "endotracheal tube", "tracheostomy tube", "chest drain tube",
        "central venous catheter", "central venous catheter via jugular vein",
        "central venous catheter via subclavian vein", "central venous catheter via umbilical vein",
        "reservoir central venous catheter", "ventriculoperitoneal drain tube",
        "artificial heart valve", "artificial aortic heart valve", "artificial mitral heart valve",
    ),
}  # fmt: skip
PADCHEST_TO_CHEXPERT: dict[str, tuple[str, ...]] = {}
for _obs, _names in _PADCHEST_GROUPS.items():
    for _name in _names:
        PADCHEST_TO_CHEXPERT[_name] = (*PADCHEST_TO_CHEXPERT.get(_name, ()), _obs)
_PADCHEST_VIEWS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP", "L": "LATERAL"}


def padchest_chexpert(labels: Iterable[str]) -> dict[str, str]:
    """PadChest lists only what a report mentions. A 'normal' study is negative for every
    pathology; otherwise unlisted observations stay 'not mentioned' (absence is not a no)."""
    out = {obs: NOT_MENTIONED for obs in CHEXPERT_OBSERVATIONS}
    names = {" ".join(label.lower().split()) for label in labels}
    if "normal" in names:
        out.update({obs: NEGATIVE for obs in PATHOLOGIES})
    for name in names:
        for obs in PADCHEST_TO_CHEXPERT.get(name, ()):
            out[obs] = POSITIVE
    if any(out[obs] == POSITIVE for obs in PATHOLOGIES):
        out["No Finding"] = NEGATIVE
    return out


def _padchest_labels(value: str) -> list[str]:
    if not value.strip() or value.strip().lower() == "nan":
        return []
    parsed = ast.literal_eval(value)  # Python-list-like text: ['cardiomegaly', 'normal']
    if not isinstance(parsed, list | tuple) or not all(isinstance(x, str) for x in parsed):
        raise ValueError("Labels is not a list of strings")
    return [x for x in parsed if x.strip()]


def _padchest_age(birth: str, study_date: str) -> int | None:
    year, born = int_or_none(study_date[:4]), int_or_none(birth)
    if year is None or born is None or not 0 <= year - born <= 120:
        return None
    return year - born


def load_padchest(
    root: Path, *, views: tuple[str, ...] | None = FRONTAL_VIEWS, check_images: bool = True
) -> list[Study]:
    """One Study per image of `views`; splits hash PatientID (StudyID when it is absent)."""
    root = Path(root).resolve()  # once, so image paths come out absolute
    csv_path = find_table(root, PADCHEST_CSV) or next(
        iter(sorted(root.glob(PADCHEST_CSV_GLOB))), None
    )
    if csv_path is None:
        raise DatasetError(f"{root}: {PADCHEST_CSV}(.gz) not found")
    required = ("ImageID", "ImageDir", "StudyID", "PatientSex_DICOM", "PatientBirth")
    rows = read_csv(csv_path, (*required, "StudyDate_DICOM", "Projection", "Labels"))
    # PadChest labels come from report text: rows and labels are never logged.
    skipped = {"unparseable Labels": 0, "bad ImageDir": 0}
    missing = [0]
    studies = []
    for row in rows:
        view = _PADCHEST_VIEWS.get(row["Projection"].strip().upper())
        if views is not None and view not in views:
            continue
        try:
            labels = _padchest_labels(row["Labels"])
        except (ValueError, SyntaxError):
            skipped["unparseable Labels"] += 1
            continue
        image_dir = int_or_none(row["ImageDir"])
        if image_dir is None:
            skipped["bad ImageDir"] += 1
            continue
        image = root / str(image_dir) / row["ImageID"]
        if not image_exists(image, check_images, missing):
            continue
        patient = row.get("PatientID") or row["StudyID"]
        studies.append(
            Study(
                id=Path(row["ImageID"]).stem,
                image=str(image),
                split=patient_split(patient),
                source="padchest",
                chexpert=padchest_chexpert(labels),
                view=view,
                sex=SEXES.get(row["PatientSex_DICOM"].strip().lower()),
                age=_padchest_age(row["PatientBirth"], row["StudyDate_DICOM"].strip()),
            )
        )
    skipped["missing image"] = missing[0]
    return finish(studies, csv_path, skipped)
