"""What every dataset-layout loader shares: the error type, patient-hash splits, streamed CSV
tables (plain or .gz), CheXpert label coding, view and sex normalization, the load summary."""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
from collections.abc import Iterable, Iterator
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
from cxrlite.data.records import Study
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")
PATHOLOGIES = tuple(o for o in CHEXPERT_OBSERVATIONS if o not in ("No Finding", "Support Devices"))
SEXES = {"male": "M", "m": "M", "female": "F", "f": "F"}


class DatasetError(CxrliteError, ValueError):
    """A dataset folder, file or row that cannot be loaded; the message names the file."""


def patient_split(patient_id: str) -> str:
    """80/10/10 train/validate/test from a hash of the patient id (stable across runs)."""
    bucket = int.from_bytes(hashlib.sha256(patient_id.encode()).digest()[:8], "big") % 100
    return "train" if bucket < 80 else "validate" if bucket < 90 else "test"


def find_table(folder: Path, name: str) -> Path | None:
    """folder/name or folder/name.gz, whichever exists."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def read_csv(path: Path, required: Iterable[str]) -> Iterator[dict[str, str]]:
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


def chexpert_columns(row: dict[str, str]) -> tuple[str, ...]:
    """The 14 labels in CHEXPERT_OBSERVATIONS order (a tuple: MIMIC keeps 227k of them)."""
    return tuple(coded_label(row.get(obs)) for obs in CHEXPERT_OBSERVATIONS)


def image_exists(path: Path, check: bool, missing: list[int]) -> bool:
    """False (and one more in missing[0]) when `check` is on and the image is not there."""
    if check and not path.is_file():
        missing[0] += 1
        return False
    return True


def finish(studies: list[Study], source: Path, skipped: dict[str, int]) -> list[Study]:
    """Log what was skipped and loaded; no study at all is an error."""
    for reason, count in skipped.items():
        if count:
            logger.warning("%s: skipped %d rows (%s)", source, count, reason)
    if not studies:
        raise DatasetError(f"{source}: no studies could be loaded (skipped: {skipped})")
    logger.info("%s: loaded %d studies", source, len(studies))
    return studies


def normal_view(value: str | None) -> str | None:
    """PA, AP or LATERAL from a dataset's own spelling; None for anything else."""
    v = (value or "").strip().upper()
    if v in ("PA", "AP"):
        return v
    if v in ("LATERAL", "LL", "L", "RL"):
        return "LATERAL"
    return None


def int_or_none(value: str | None) -> int | None:
    """An integer from text such as "68" or "1930.0"; None when blank or not a number."""
    try:
        return int(float(value)) if value not in (None, "") else None
    except ValueError:
        return None
