"""Loaders that turn the published chest X-ray dataset layouts into `list[Study]`.

Layouts (`LOADERS`, picked by name or by `detect_layout`):
- ``mimic-cxr-jpg``: ``files/p10/p10000032/s50414267/<dicom_id>.jpg`` with
  ``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv[.gz]``; reports from the MIMIC-CXR reports
  archive (``files/p10/p10000032/s50414267.txt``) in the root, in ``mimic-cxr-reports/`` or in
  ``reports_root``.
- ``chexpert``: ``CheXpert-v1.0-small/{train,valid}.csv`` (``Path`` column relative to the
  folder above ``CheXpert-v1.0-small``); no reports.
- ``iu-xray``: Open-I ``ecgen-radiology/*.xml`` reports with ``NLMCXR_png/<parentImage id>.png``.
- ``padchest``: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv[.gz]`` with images at
  ``<ImageDir>/<ImageID>``; labels mapped to CheXpert observations, no English reports.
- ``jsonl``: one JSON object a line (schema in `load_jsonl`).
- ``phantom``: the ``manifest.jsonl`` of our phantom generator (`Study.to_dict` rows).

Every loader returns ABSOLUTE image paths, so the studies can be written to a manifest
anywhere. Splits are the dataset's official ones where it has them (MIMIC, CheXpert), else
`patient_split` (a hash of the patient id, so a patient never spans two splits).
"""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import json
import logging
import xml.etree.ElementTree as ET  # stdlib parser: local dataset files, not uploads
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    LABEL_VALUES,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
)
from cxrlite.data.records import SPLITS, Study
from cxrlite.errors import CxrliteError
from cxrlite.eval.sections import findings_and_impression
from cxrlite.fileio import read_jsonl

logger = logging.getLogger(__name__)

FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")
PATHOLOGIES = tuple(o for o in CHEXPERT_OBSERVATIONS if o not in ("No Finding", "Support Devices"))


class DatasetError(CxrliteError, ValueError):
    """A dataset folder, file or row that cannot be loaded; the message names the file."""


def patient_split(patient_id: str) -> str:
    """80/10/10 train/validate/test from a hash of the patient id (stable across runs)."""
    bucket = int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "validate" if bucket < 90 else "test"


# ---------------------------------------------------------------- shared CSV / label helpers


def _find_table(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_csv(path: Path, required: Iterable[str]) -> Iterator[dict[str, str]]:
    """Rows streamed (MIMIC and PadChest tables have 100k+ rows); errors name the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DatasetError(f"{path}: missing columns {missing}")
            yield from reader
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: cannot read CSV ({e})") from None


_CODED_LABELS = {1.0: POSITIVE, 0.0: NEGATIVE, -1.0: UNCERTAIN}


def coded_label(value: Any) -> str:
    """CheXpert coding (1 / 0 / -1 / blank, as text or number) or a LABEL_VALUES string."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return NOT_MENTIONED
    if isinstance(value, str) and value.strip().lower() in LABEL_VALUES:
        return value.strip().lower()
    try:
        return _CODED_LABELS[float(value)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"label value {value!r} is not 1, 0, -1, blank or {LABEL_VALUES}"
        ) from None


def _chexpert_columns(row: dict[str, str]) -> tuple[str, ...]:
    """The 14 labels in CHEXPERT_OBSERVATIONS order (a tuple: MIMIC keeps 227k of them)."""
    return tuple(coded_label(row.get(obs)) for obs in CHEXPERT_OBSERVATIONS)


def _image_exists(path: Path, check: bool, missing: list[int]) -> bool:
    if check and not path.is_file():
        missing[0] += 1
        return False
    return True


def _finish(studies: list[Study], source: Path, skipped: dict[str, int]) -> list[Study]:
    for reason, count in skipped.items():
        if count:
            logger.warning("%s: skipped %d rows (%s)", source, count, reason)
    if not studies:
        raise DatasetError(f"{source}: no studies could be loaded (skipped: {skipped})")
    logger.info("%s: loaded %d studies", source, len(studies))
    return studies


def _normal_view(value: str | None) -> str | None:
    v = (value or "").strip().upper()
    if v in ("PA", "AP"):
        return v
    if v in ("LATERAL", "LL", "L", "RL"):
        return "LATERAL"
    return None


# ---------------------------------------------------------------- MIMIC-CXR-JPG


def _mimic_report(report_roots: list[Path], subject: str, study: str) -> str | None:
    rel = Path(f"p{subject[:2]}") / f"p{subject}" / f"s{study}.txt"
    for base in report_roots:
        for candidate in (base / "files" / rel, base / rel):
            if candidate.is_file():
                return candidate.read_text(encoding="utf-8", errors="replace")
    return None


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
    meta_path = _find_table(root, "mimic-cxr-2.0.0-metadata.csv")
    if meta_path is None:
        raise DatasetError(f"{root}: mimic-cxr-2.0.0-metadata.csv(.gz) not found")
    meta = _read_csv(meta_path, ("dicom_id", "subject_id", "study_id", "ViewPosition"))

    split_path = _find_table(root, "mimic-cxr-2.0.0-split.csv")
    official: dict[str, str] = {}
    if split_path is None:
        logger.warning("%s: no mimic-cxr-2.0.0-split.csv; splitting by patient hash", root)
    else:
        for row in _read_csv(split_path, ("dicom_id", "split")):
            official[row["dicom_id"]] = row["split"]

    labels_by_study: dict[str, tuple[str, ...]] = {}
    skipped = {"missing image": 0, "bad label value": 0, "bad split": 0, "bad ids": 0}
    label_path = _find_table(root, f"mimic-cxr-2.0.0-{label_file}.csv")
    if label_path is None:
        logger.warning("%s: no mimic-cxr-2.0.0-%s.csv; studies get no labels", root, label_file)
    else:
        for row in _read_csv(label_path, ("study_id", *CHEXPERT_OBSERVATIONS)):
            try:
                labels_by_study[row["study_id"]] = _chexpert_columns(row)
            except ValueError:
                skipped["bad label value"] += 1

    report_roots = [Path(reports_root)] if reports_root else []
    report_roots += [root, root / "mimic-cxr-reports"]
    reports: dict[str, tuple[str | None, str | None]] = {}
    missing = [0]
    studies = []
    for row in meta:
        view = _normal_view(row["ViewPosition"])
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
        if not _image_exists(image, check_images, missing):
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
    return _finish(studies, meta_path, skipped)


# ---------------------------------------------------------------- CheXpert

_CHEXPERT_DIRS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
_CHEXPERT_SPLITS = (("train.csv", "train"), ("valid.csv", "validate"), ("test.csv", "test"))
_SEXES = {"male": "M", "m": "M", "female": "F", "f": "F"}


def _chexpert_dir(root: Path) -> Path | None:
    for folder in (root, *(root / d for d in _CHEXPERT_DIRS)):
        if any((folder / name).is_file() for name, _ in _CHEXPERT_SPLITS):
            return folder
    return None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(float(value)) if value not in (None, "") else None
    except ValueError:
        return None


def load_chexpert(
    root: Path, *, views: tuple[str, ...] | None = FRONTAL_VIEWS, check_images: bool = True
) -> list[Study]:
    """train.csv -> train, valid.csv -> validate, test.csv (if present) -> test."""
    root = Path(root).resolve()  # once, so image paths come out absolute
    data_dir = _chexpert_dir(root)
    if data_dir is None:
        raise DatasetError(
            f"{root}: no CheXpert train.csv / valid.csv (looked in {_CHEXPERT_DIRS})"
        )
    required = ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS)
    skipped = {"missing image": 0, "bad label value": 0}
    missing = [0]
    studies = []
    for name, split in _CHEXPERT_SPLITS:
        csv_path = data_dir / name
        if not csv_path.is_file():
            continue
        for row in _read_csv(csv_path, required):
            rel = Path(row["Path"])
            # Paths start with the dataset folder's own name (CheXpert-v1.0-small/train/...).
            base = data_dir.parent if rel.parts and rel.parts[0] == data_dir.name else data_dir
            inner = rel.relative_to(data_dir.name) if base == data_dir.parent else rel
            if row["Frontal/Lateral"].strip().lower() == "lateral":
                view = "LATERAL"
            else:
                view = _normal_view(row["AP/PA"])
            if views is not None and view not in views:
                continue
            try:
                chexpert = _chexpert_columns(row)
            except ValueError:
                skipped["bad label value"] += 1
                continue
            image = base / rel
            if not _image_exists(image, check_images, missing):
                continue
            age = _int_or_none(row.get("Age"))
            studies.append(
                Study(
                    id=str(inner.with_suffix("")),
                    image=str(image),
                    split=split,
                    source="chexpert",
                    chexpert=dict(zip(CHEXPERT_OBSERVATIONS, chexpert, strict=True)),
                    view=view,
                    sex=_SEXES.get((row.get("Sex") or "").strip().lower()),
                    age=age if age else None,  # CheXpert codes unknown age as 0
                )
            )
    skipped["missing image"] = missing[0]
    return _finish(studies, data_dir, skipped)


# ---------------------------------------------------------------- IU X-ray / Open-I


def _labeler() -> Callable[[str], Any] | None:
    """cxrlite.eval.labeler.label_report if that module is installed (a broken one raises)."""
    try:
        from cxrlite.eval.labeler import label_report
    except ModuleNotFoundError as e:
        if e.name != "cxrlite.eval.labeler":
            raise
        return None
    return label_report


def _iu_labels(label_report: Callable[[str], Any] | None, study: Study) -> dict[str, str]:
    text = " ".join(t for t in (study.findings, study.impression) if t)
    if label_report is None or not text:
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
    label_report = _labeler()
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
            if not _image_exists(image, check_images, missing):
                continue
            study = Study(
                id=image_id,
                image=str(image),
                split=patient_split(report_id),
                source="iu-xray",
                findings=sections.get("FINDINGS") or None,
                impression=sections.get("IMPRESSION") or None,
            )
            study.chexpert = _iu_labels(label_report, study)
            studies.append(study)
    skipped["missing image"] = missing[0]
    return _finish(studies, reports_dir, skipped)


# ---------------------------------------------------------------- PadChest

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
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
    year, born = _int_or_none(study_date[:4]), _int_or_none(birth)
    if year is None or born is None or not 0 <= year - born <= 120:
        return None
    return year - born


def load_padchest(
    root: Path, *, views: tuple[str, ...] | None = FRONTAL_VIEWS, check_images: bool = True
) -> list[Study]:
    """One Study per image of `views`; splits hash PatientID (StudyID when it is absent)."""
    root = Path(root).resolve()  # once, so image paths come out absolute
    csv_path = _find_table(root, PADCHEST_CSV) or next(
        iter(sorted(root.glob("PADCHEST_chest_x_ray_images_labels_160K*.csv*"))), None
    )
    if csv_path is None:
        raise DatasetError(f"{root}: {PADCHEST_CSV}(.gz) not found")
    required = ("ImageID", "ImageDir", "StudyID", "PatientSex_DICOM", "PatientBirth")
    rows = _read_csv(csv_path, (*required, "StudyDate_DICOM", "Projection", "Labels"))
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
        image_dir = _int_or_none(row["ImageDir"])
        if image_dir is None:
            skipped["bad ImageDir"] += 1
            continue
        image = root / str(image_dir) / row["ImageID"]
        if not _image_exists(image, check_images, missing):
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
                sex=_SEXES.get(row["PatientSex_DICOM"].strip().lower()),
                age=_padchest_age(row["PatientBirth"], row["StudyDate_DICOM"].strip()),
            )
        )
    skipped["missing image"] = missing[0]
    return _finish(studies, csv_path, skipped)


# ---------------------------------------------------------------- generic JSONL and phantoms

_SPLIT_ALIASES = {"train": "train", "val": "validate", "valid": "validate", "validate": "validate",
                  "validation": "validate", "test": "test"}  # fmt: skip


def _jsonl_file(root: Path, preferred: str) -> Path:
    if root.is_file():
        return root
    if (root / preferred).is_file():
        return root / preferred
    found = sorted(root.glob("*.jsonl"))
    if len(found) != 1:
        raise DatasetError(
            f"{root}: expected {preferred} or exactly one .jsonl file, found {len(found)}"
        )
    return found[0]


def _jsonl_study(row: dict[str, Any], folder: Path) -> Study:
    if not isinstance(row.get("image"), str) or not row["image"]:
        raise ValueError("no 'image' path")
    image = folder / row["image"]
    findings, impression = row.get("findings"), row.get("impression")
    if not (findings or impression) and row.get("report"):
        findings, impression = findings_and_impression(row["report"])
    labels = row.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError("'labels' must be an object of observation -> value")
    patient = str(row.get("patient_id") or row.get("id") or row["image"])
    split = row.get("split")
    if split is not None and str(split).lower() not in _SPLIT_ALIASES:
        raise ValueError(f"split {split!r} is not one of {sorted(_SPLIT_ALIASES)}")
    age = row.get("age")
    return Study(
        id=str(row.get("id") or Path(row["image"]).with_suffix("")),
        image=str(image.resolve()),
        split=_SPLIT_ALIASES[str(split).lower()] if split is not None else patient_split(patient),
        source=str(row.get("source") or "jsonl"),
        findings=findings or None,
        impression=impression or None,
        chexpert={str(k): coded_label(v) for k, v in labels.items()},
        view=_normal_view(row.get("view")),
        sex=_SEXES.get(str(row.get("sex") or "").strip().lower()),
        age=int(age) if age is not None else None,
    )


def load_jsonl(root: Path, *, check_images: bool = True) -> list[Study]:
    """Generic JSONL, one object a line:

    image (required; relative to the JSONL file's folder, or absolute), id, findings,
    impression, report (free text, split into sections when findings/impression are absent),
    labels ({CheXpert observation: 1 / 0 / -1 / null or "positive" ...}), split
    (train/val/validate/test; absent: hash of patient_id, else of id), patient_id,
    view (PA/AP/LATERAL), sex (M/F), age, source (default "jsonl").
    """
    path = _jsonl_file(root, "data.jsonl")
    skipped_missing = [0]
    studies = []
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            study = _jsonl_study(row, path.parent)
        except (ValueError, TypeError, KeyError) as e:
            raise DatasetError(f"{path}: record {n}: {e}") from None
        if _image_exists(Path(study.image), check_images, skipped_missing):
            studies.append(study)
    return _finish(studies, path, {"missing image": skipped_missing[0]})


def load_phantom(root: Path, *, check_images: bool = True) -> list[Study]:
    """The phantom generator's manifest.jsonl: Study.to_dict rows, images relative to it."""
    path = _jsonl_file(root, "manifest.jsonl")
    skipped_missing = [0]
    studies = []
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            study = Study.from_dict(row)
        except (ValueError, TypeError, KeyError) as e:
            raise DatasetError(f"{path}: record {n}: {e}") from None
        study.image = str((path.parent / study.image).resolve())
        if _image_exists(Path(study.image), check_images, skipped_missing):
            studies.append(study)
    return _finish(studies, path, {"missing image": skipped_missing[0]})


# ---------------------------------------------------------------- registry

LOADERS: dict[str, Callable[..., list[Study]]] = {
    "mimic-cxr-jpg": load_mimic_cxr_jpg,
    "chexpert": load_chexpert,
    "iu-xray": load_iu_xray,
    "padchest": load_padchest,
    "jsonl": load_jsonl,
    "phantom": load_phantom,
}


def _is_phantom_manifest(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        row = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and row.get("source") == "phantom" and "labels" in row


def detect_layout(root: str | Path) -> str:
    """The LOADERS name whose layout `root` (a folder, or a .jsonl file) is in."""
    root = Path(root)
    if root.is_file():
        if root.suffix == ".jsonl":
            return "phantom" if _is_phantom_manifest(root) else "jsonl"
        raise DatasetError(f"{root}: a file must be a .jsonl manifest")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if _find_table(root, "mimic-cxr-2.0.0-metadata.csv"):
        return "mimic-cxr-jpg"
    if any(root.glob("PADCHEST_chest_x_ray_images_labels_160K*.csv*")):
        return "padchest"
    if _chexpert_dir(root) is not None:
        return "chexpert"
    if (root / "ecgen-radiology").is_dir():
        return "iu-xray"
    if (root / "manifest.jsonl").is_file() and _is_phantom_manifest(root / "manifest.jsonl"):
        return "phantom"
    if any(root.glob("*.jsonl")):
        return "jsonl"
    raise DatasetError(
        f"{root}: no known dataset layout (looked for mimic-cxr-2.0.0-metadata.csv, {PADCHEST_CSV}, "
        "CheXpert train.csv/valid.csv, ecgen-radiology/, manifest.jsonl, *.jsonl)"
    )


def load_dataset(name: str, root: str | Path, **opts: Any) -> list[Study]:
    """Load `root` with the loader `name` ("auto": `detect_layout`); opts go to the loader."""
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such file or folder")
    if name == "auto":
        name = detect_layout(root)
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset layout {name!r}; known: {sorted(LOADERS)}")
    return LOADERS[name](root, **opts)
