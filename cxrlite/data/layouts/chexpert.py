"""CheXpert: ``CheXpert-v1.0-small/{train,valid}.csv`` (``Path`` column relative to the folder
above ``CheXpert-v1.0-small``); official splits, no reports."""

from __future__ import annotations

from pathlib import Path

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS
from cxrlite.data.layouts.common import (
    FRONTAL_VIEWS,
    SEXES,
    DatasetError,
    chexpert_columns,
    finish,
    image_exists,
    int_or_none,
    normal_view,
    read_csv,
)
from cxrlite.data.records import Study

CHEXPERT_DIRS = ("CheXpert-v1.0-small", "CheXpert-v1.0")
_CHEXPERT_SPLITS = (("train.csv", "train"), ("valid.csv", "validate"), ("test.csv", "test"))


def chexpert_dir(root: Path) -> Path | None:
    """The folder holding train.csv / valid.csv: `root` itself or one of CHEXPERT_DIRS in it."""
    for folder in (root, *(root / d for d in CHEXPERT_DIRS)):
        if any((folder / name).is_file() for name, _ in _CHEXPERT_SPLITS):
            return folder
    return None


def load_chexpert(
    root: Path, *, views: tuple[str, ...] | None = FRONTAL_VIEWS, check_images: bool = True
) -> list[Study]:
    """train.csv -> train, valid.csv -> validate, test.csv (if present) -> test."""
    root = Path(root).resolve()  # once, so image paths come out absolute
    data_dir = chexpert_dir(root)
    if data_dir is None:
        raise DatasetError(f"{root}: no CheXpert train.csv / valid.csv (looked in {CHEXPERT_DIRS})")
    required = ("Path", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS)
    skipped = {"missing image": 0, "bad label value": 0}
    missing = [0]
    studies = []
    for name, split in _CHEXPERT_SPLITS:
        csv_path = data_dir / name
        if not csv_path.is_file():
            continue
        for row in read_csv(csv_path, required):
            rel = Path(row["Path"])
            # Paths start with the dataset folder's own name (CheXpert-v1.0-small/train/...).
            base = data_dir.parent if rel.parts and rel.parts[0] == data_dir.name else data_dir
            inner = rel.relative_to(data_dir.name) if base == data_dir.parent else rel
            if row["Frontal/Lateral"].strip().lower() == "lateral":
                view = "LATERAL"
            else:
                view = normal_view(row["AP/PA"])
            if views is not None and view not in views:
                continue
            try:
                chexpert = chexpert_columns(row)
            except ValueError:
                skipped["bad label value"] += 1
                continue
            image = base / rel
            if not image_exists(image, check_images, missing):
                continue
            age = int_or_none(row.get("Age"))
            studies.append(
                Study(
                    id=str(inner.with_suffix("")),
                    image=str(image),
                    split=split,
                    source="chexpert",
                    chexpert=dict(zip(CHEXPERT_OBSERVATIONS, chexpert, strict=True)),
                    view=view,
                    sex=SEXES.get((row.get("Sex") or "").strip().lower()),
                    age=age if age else None,  # CheXpert codes unknown age as 0
                )
            )
    skipped["missing image"] = missing[0]
    return finish(studies, data_dir, skipped)
