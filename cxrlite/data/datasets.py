"""Loaders that turn the published chest X-ray dataset layouts into `list[Study]`.

Layouts (`LOADERS`, picked by name or by `detect_layout`), one module each:
- ``mimic-cxr-jpg`` (`cxrlite.data.layouts.mimic_cxr`): ``files/p10/p10000032/s50414267/<dicom_id>.jpg``
  with ``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv[.gz]`` and the reports archive.
- ``chexpert`` (`cxrlite.data.layouts.chexpert`): ``CheXpert-v1.0-small/{train,valid}.csv``; no reports.
- ``iu-xray`` (`cxrlite.data.layouts.iu_xray`): Open-I ``ecgen-radiology/*.xml`` reports with
  ``NLMCXR_png/<parentImage id>.png``.
- ``padchest`` (`cxrlite.data.layouts.padchest`): ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``
  with images at ``<ImageDir>/<ImageID>``; labels mapped to CheXpert observations.
- ``jsonl`` and ``phantom`` (`cxrlite.data.layouts.jsonl`): one JSON object a line (schema in
  `load_jsonl`), and the ``manifest.jsonl`` of our phantom generator (`Study.to_dict` rows).
What they share (DatasetError, `patient_split`, CSV and label helpers) is in
`cxrlite.data.layouts.common`; this module re-exports the public names, so callers import here.

Every loader returns ABSOLUTE image paths, so the studies can be written to a manifest
anywhere. Splits are the dataset's official ones where it has them (MIMIC, CheXpert), else
`patient_split` (a hash of the patient id, so a patient never spans two splits).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrlite.data.layouts.chexpert import chexpert_dir, load_chexpert
from cxrlite.data.layouts.common import (
    FRONTAL_VIEWS,
    PATHOLOGIES,
    DatasetError,
    coded_label,
    find_table,
    patient_split,
)
from cxrlite.data.layouts.iu_xray import load_iu_xray
from cxrlite.data.layouts.jsonl import is_phantom_manifest, load_jsonl, load_phantom
from cxrlite.data.layouts.mimic_cxr import METADATA_CSV, load_mimic_cxr_jpg
from cxrlite.data.layouts.padchest import (
    PADCHEST_CSV,
    PADCHEST_CSV_GLOB,
    PADCHEST_TO_CHEXPERT,
    load_padchest,
    padchest_chexpert,
)
from cxrlite.data.records import Study

__all__ = [
    "FRONTAL_VIEWS",
    "LOADERS",
    "PADCHEST_CSV",
    "PADCHEST_TO_CHEXPERT",
    "PATHOLOGIES",
    "DatasetError",
    "coded_label",
    "detect_layout",
    "load_chexpert",
    "load_dataset",
    "load_iu_xray",
    "load_jsonl",
    "load_mimic_cxr_jpg",
    "load_padchest",
    "load_phantom",
    "padchest_chexpert",
    "patient_split",
]

LOADERS: dict[str, Callable[..., list[Study]]] = {
    "mimic-cxr-jpg": load_mimic_cxr_jpg,
    "chexpert": load_chexpert,
    "iu-xray": load_iu_xray,
    "padchest": load_padchest,
    "jsonl": load_jsonl,
    "phantom": load_phantom,
}


def detect_layout(root: str | Path) -> str:
    """The LOADERS name whose layout `root` (a folder, or a .jsonl file) is in."""
    root = Path(root)
    if root.is_file():
        if root.suffix == ".jsonl":
            return "phantom" if is_phantom_manifest(root) else "jsonl"
        raise DatasetError(f"{root}: a file must be a .jsonl manifest")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    if find_table(root, METADATA_CSV):
        return "mimic-cxr-jpg"
    if any(root.glob(PADCHEST_CSV_GLOB)):
        return "padchest"
    if chexpert_dir(root) is not None:
        return "chexpert"
    if (root / "ecgen-radiology").is_dir():
        return "iu-xray"
    if (root / "manifest.jsonl").is_file() and is_phantom_manifest(root / "manifest.jsonl"):
        return "phantom"
    if any(root.glob("*.jsonl")):
        return "jsonl"
    raise DatasetError(
        f"{root}: no known dataset layout (looked for {METADATA_CSV}, {PADCHEST_CSV}, "
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
