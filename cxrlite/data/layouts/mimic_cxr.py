"""MIMIC-CXR-JPG: ``files/p10/p10000032/s50414267/<dicom_id>.jpg`` with
``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv[.gz]``; reports from the MIMIC-CXR reports
archive (``files/p10/p10000032/s50414267.txt``) in the root, in ``mimic-cxr-reports/`` or in
``reports_root``. Splits are the official ones (a patient hash when the split table is absent).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS
from cxrlite.data.layouts.common import (
    FRONTAL_VIEWS,
    DatasetError,
    chexpert_columns,
    find_table,
    finish,
    image_exists,
    normal_view,
    patient_split,
    read_csv,
)
from cxrlite.data.records import SPLITS, Study
from cxrlite.eval.sections import findings_and_impression

logger = logging.getLogger(__name__)

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"


def _mimic_report(report_roots: list[Path], subject: str, study: str) -> str | None:
    rel = Path(f"p{subject[:2]}") / f"p{subject}" / f"s{study}.txt"
    for base in report_roots:
        for candidate in (base / "files" / rel, base / rel):
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8", errors="replace")
    return None


def _official_splits(root: Path) -> dict[str, str]:
    split_path = find_table(root, "mimic-cxr-2.0.0-split.csv")
    if split_path is None:
        logger.warning("%s: no mimic-cxr-2.0.0-split.csv; splitting by patient hash", root)
        return {}
    return {row["dicom_id"]: row["split"] for row in read_csv(split_path, ("dicom_id", "split"))}


def _labels_by_study(
    root: Path, label_file: str, skipped: dict[str, int]
) -> dict[str, tuple[str, ...]]:
    label_path = find_table(root, f"mimic-cxr-2.0.0-{label_file}.csv")
    if label_path is None:
        logger.warning("%s: no mimic-cxr-2.0.0-%s.csv; studies get no labels", root, label_file)
        return {}
    labels: dict[str, tuple[str, ...]] = {}
    for row in read_csv(label_path, ("study_id", *CHEXPERT_OBSERVATIONS)):
        try:
            labels[row["study_id"]] = chexpert_columns(row)
        except ValueError:
            skipped["bad label value"] += 1
    return labels


def load_mimic_cxr_jpg(
    root: Path,
    *,
    views: tuple[str, ...] | None = FRONTAL_VIEWS,
    reports_root: str | Path | None = None,
    label_file: str = "chexpert",
    check_images: bool = True,
) -> list[Study]:
    """One Study per image of `views` (None: every image). `label_file`: chexpert or negbio."""
    root = Path(root).resolve()  # once, so image paths come out absolute
    meta_path = find_table(root, METADATA_CSV)
    if meta_path is None:
        raise DatasetError(f"{root}: {METADATA_CSV}(.gz) not found")
    meta = read_csv(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
    official = _official_splits(root)
    skipped = {"missing image": 0, "bad label value": 0, "bad split": 0, "bad ids": 0}
    labels_by_study = _labels_by_study(root, label_file, skipped)

    report_roots = [Path(reports_root)] if reports_root else []
    report_roots += [root, root / "mimic-cxr-reports"]
    reports: dict[str, tuple[str | None, str | None]] = {}
    missing = [0]
    studies = []
    for row in meta:
        view = normal_view(row["ViewPosition"])
        if views is not None and view not in views:
            continue
        subject, study_id, dicom = row["subject_id"], row["study_id"], row["dicom_id"]
        if not (subject.isdigit() and len(subject) >= 2 and study_id.isdigit() and dicom):
            skipped["bad ids"] += 1
            continue
        split = official.get(dicom) if official else patient_split(subject)
        if split not in SPLITS:
            skipped["bad split"] += 1
            continue
        image = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study_id}" / f"{dicom}.jpg"
        if not image_exists(image, check_images, missing):
            continue
        if study_id not in reports:
            text = _mimic_report(report_roots, subject, study_id)
            reports[study_id] = findings_and_impression(text) if text else (None, None)
        findings, impression = reports[study_id]
        labels = labels_by_study.get(study_id)
        studies.append(
            Study(
                id=f"s{study_id}/{dicom}",
                image=str(image),
                split=split,
                source="mimic-cxr-jpg",
                findings=findings,
                impression=impression,
                chexpert=dict(zip(CHEXPERT_OBSERVATIONS, labels, strict=True)) if labels else {},
                view=view,
            )
        )
    skipped["missing image"] = missing[0]
    no_report = sum(1 for f, i in reports.values() if f is None and i is None)
    if no_report:
        logger.warning("%s: %d studies have no report text", root, no_report)
    return finish(studies, meta_path, skipped)
