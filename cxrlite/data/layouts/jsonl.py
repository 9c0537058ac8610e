"""The two JSONL layouts: a generic one (schema in `load_jsonl`) and the ``manifest.jsonl`` of
our phantom generator (`Study.to_dict` rows). Images are relative to the JSONL file's folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrlite.data.layouts.common import (
    SEXES,
    DatasetError,
    coded_label,
    finish,
    image_exists,
    normal_view,
    patient_split,
)
from cxrlite.data.records import Study
from cxrlite.eval.sections import findings_and_impression
from cxrlite.fileio import read_jsonl

_SPLIT_ALIASES = {"train": "train", "val": "validate", "valid": "validate", "validate": "validate",
                  "validation": "validate", "test": "test"}  # fmt: skip


def jsonl_file(root: Path, preferred: str) -> Path:
    """`root` itself when it is a file, else root/preferred, else the only *.jsonl in root."""
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


def is_phantom_manifest(path: Path) -> bool:
    """Whether the first record of `path` is a phantom generator row."""
    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        row = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(row, dict) and row.get("source") == "phantom" and "labels" in row


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
        view=normal_view(row.get("view")),
        sex=SEXES.get(str(row.get("sex") or "").strip().lower()),
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
    path = jsonl_file(root, "data.jsonl")
    skipped_missing = [0]
    studies = []
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            study = _jsonl_study(row, path.parent)
        except (ValueError, TypeError, KeyError) as e:
            raise DatasetError(f"{path}: record {n}: {e}") from None
        if image_exists(Path(study.image), check_images, skipped_missing):
            studies.append(study)
    return finish(studies, path, {"missing image": skipped_missing[0]})


def load_phantom(root: Path, *, check_images: bool = True) -> list[Study]:
    """The phantom generator's manifest.jsonl: Study.to_dict rows, images relative to it."""
    path = jsonl_file(root, "manifest.jsonl")
    skipped_missing = [0]
    studies = []
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            study = Study.from_dict(row)
        except (ValueError, TypeError, KeyError) as e:
            raise DatasetError(f"{path}: record {n}: {e}") from None
        study.image = str((path.parent / study.image).resolve())
        if image_exists(Path(study.image), check_images, skipped_missing):
            studies.append(study)
    return finish(studies, path, {"missing image": skipped_missing[0]})
