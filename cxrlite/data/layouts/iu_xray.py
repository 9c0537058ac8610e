"""IU X-ray / Open-I: ``ecgen-radiology/*.xml`` reports with ``NLMCXR_png/<parentImage id>.png``.
The dataset has no label table: each study's CheXpert labels come from our report labeler."""

from __future__ import annotations

import xml.etree.ElementTree as ET  # stdlib parser: local dataset files, not uploads
from pathlib import Path

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, LABEL_VALUES
from cxrlite.data.layouts.common import DatasetError, finish, image_exists, patient_split
from cxrlite.data.records import Study
from cxrlite.eval.labeler import label_report


def _report_labels(study: Study) -> dict[str, str]:
    text = " ".join(t for t in (study.findings, study.impression) if t)
    if not text:
        return {}
    labels = dict(label_report(text))
    return {k: v for k, v in labels.items() if k in CHEXPERT_OBSERVATIONS and v in LABEL_VALUES}


def load_iu_xray(root: Path, *, check_images: bool = True) -> list[Study]:
    """One Study per parentImage of each report; IU gives no per-image view, so view is None.

    Splits hash the report id (uId, e.g. CXR1): Open-I has one study per patient.
    """
    root = Path(root).resolve()  # once, so image paths come out absolute
    reports_dir = root / "ecgen-radiology"
    images_dir = root / "NLMCXR_png"
    if not reports_dir.is_dir():
        raise DatasetError(f"{root}: no ecgen-radiology/ folder of Open-I XML reports")
    xml_files = sorted(reports_dir.glob("*.xml"), key=lambda p: (len(p.stem), p.stem))
    if not xml_files:
        raise DatasetError(f"{reports_dir}: no .xml reports")
    skipped = {"unparseable XML": 0, "no image": 0}
    missing = [0]
    studies = []
    for xml_path in xml_files:
        try:
            doc = ET.parse(xml_path).getroot()
        except ET.ParseError:
            skipped["unparseable XML"] += 1
            continue
        uid = doc.find(".//uId")
        report_id = uid.get("id") if uid is not None and uid.get("id") else xml_path.stem
        sections = {
            (el.get("Label") or "").strip().upper(): " ".join((el.text or "").split())
            for el in doc.iter("AbstractText")
        }
        image_ids = [el.get("id") for el in doc.iter("parentImage") if el.get("id")]
        if not image_ids:
            skipped["no image"] += 1
        for image_id in image_ids:
            image = images_dir / f"{image_id}.png"
            if not image_exists(image, check_images, missing):
                continue
            study = Study(
                id=image_id,
                image=str(image),
                split=patient_split(report_id),
                source="iu-xray",
                findings=sections.get("FINDINGS") or None,
                impression=sections.get("IMPRESSION") or None,
            )
            study.chexpert = _report_labels(study)
            studies.append(study)
    skipped["missing image"] = missing[0]
    return finish(studies, reports_dir, skipped)
