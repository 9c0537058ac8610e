"""Is this DICOM instance a chest radiograph? The check in front of every DICOM report.

`chest_radiograph_refusal(ds)` answers None (report it) or one reason from `REFUSALS`: short,
fixed, machine-friendly strings that never carry patient data, so they can be logged, shown and
counted (their `code`s label the Prometheus counters). The rules, in order:

- pixel data present;
- Modality CR or DX, or OT with a Secondary Capture SOP class ("OT-SC");
- SOP class CR Image Storage, Digital X-Ray Image Storage (For Presentation or For Processing)
  or Secondary Capture Image Storage;
- BodyPartExamined, when present and not empty, names the chest (CHEST, THORAX, LUNG, ...);
- a Secondary Capture shows chest evidence: a chest BodyPartExamined, a chest word in the study
  or series description or protocol name, or a radiographic ViewPosition (PA, AP, LL, LATERAL);
- one frame, one sample per pixel, MONOCHROME1 or MONOCHROME2;
- at least `MIN_SIDE` pixels a side.

Only DICOM carries this metadata: a PNG or JPEG is accepted as it is. pydicom only (no `pacs`
extra), so `cxrlite report` and `/v1/reports` check without it; `--allow-non-chest` (CLI) and
`allow_non_chest=true` (HTTP form field) report anyway.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import pydicom
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)

from cxrlite.imaging.errors import ImageError

MIN_SIDE = 256  # pixels; real chest radiographs are 1000-4300 a side

# The refusals: reason (what users read) -> code (a metric label, an error code's suffix).
NO_PIXEL_DATA = "no pixel data"
WRONG_MODALITY = "modality not CR/DX/OT-SC"
WRONG_SOP_CLASS = "SOP class not CR, DX or secondary capture image"
NOT_CHEST = "body part not chest"
SC_WITHOUT_CHEST = "secondary capture without chest evidence"
NOT_GRAYSCALE = "not a single-frame grayscale image"
TOO_SMALL = "image too small"
REFUSALS: dict[str, str] = {
    NO_PIXEL_DATA: "no_pixel_data",
    WRONG_MODALITY: "modality",
    WRONG_SOP_CLASS: "sop_class",
    NOT_CHEST: "body_part",
    SC_WITHOUT_CHEST: "secondary_capture",
    NOT_GRAYSCALE: "not_grayscale",
    TOO_SMALL: "too_small",
}

RADIOGRAPH_SOP_CLASSES = {
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
}
CHEST_WORDS = {"CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "TORAX", "CXR"}
CHEST_VIEWS = {"PA", "AP", "LL", "RL", "LATERAL", "LAT"}
FRONTAL_VIEWS, LATERAL_VIEWS = {"PA", "AP"}, {"LL", "RL", "LATERAL", "LAT"}
# SNOMED CT codes of DICOM's CID 4010 (DX View) in a ViewCodeSequence.
FRONTAL_CODES = {"399348003", "272479007", "399033003"}  # antero-/postero-anterior, frontal
LATERAL_CODES = {"399067008", "399173006", "399198007"}  # lateral, left / right lateral
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_DESCRIPTIONS = ("StudyDescription", "SeriesDescription", "ProtocolName")
_HEADER_DEFER = 4096  # bytes: larger values (pixels) are not read by the check


class NotChestRadiographError(ImageError):
    """A DICOM instance that the chest check refuses; `reason` is one of REFUSALS."""

    code = "not_chest_radiograph"
    http_status = 422

    def __init__(self, source: str, reason: str, override: str):
        self.reason = reason
        super().__init__(source, f"not a chest radiograph ({reason}); {override}")


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip().upper() if value is not None else ""


def _words(text: str) -> set[str]:
    return set(re.split(r"[^A-Z]+", text.upper())) - {""}


def _has_chest_evidence(ds: pydicom.Dataset) -> bool:
    if _words(_text(ds, "BodyPartExamined")) & CHEST_WORDS:
        return True
    if any(_words(_text(ds, keyword)) & CHEST_WORDS for keyword in _DESCRIPTIONS):
        return True
    return _text(ds, "ViewPosition") in CHEST_VIEWS


def chest_radiograph_refusal(ds: pydicom.Dataset) -> str | None:
    """None when `ds` is a chest radiograph to report, else why not (one of REFUSALS)."""
    if not any(tag in ds for tag in PIXEL_TAGS):
        return NO_PIXEL_DATA
    modality, sop_class = _text(ds, "Modality"), str(ds.get("SOPClassUID", "")).strip()
    is_sc = sop_class == SecondaryCaptureImageStorage
    if not (modality in ("CR", "DX") or (modality == "OT" and is_sc)):
        return WRONG_MODALITY
    if sop_class not in RADIOGRAPH_SOP_CLASSES and not is_sc:
        return WRONG_SOP_CLASS
    body_part = _text(ds, "BodyPartExamined")
    if body_part and not _words(body_part) & CHEST_WORDS:
        return NOT_CHEST
    if is_sc and not _has_chest_evidence(ds):
        return SC_WITHOUT_CHEST
    try:
        samples, frames = int(ds.get("SamplesPerPixel", 1)), int(ds.get("NumberOfFrames", 1) or 1)
        rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    except (TypeError, ValueError):
        return NOT_GRAYSCALE
    photometric = _text(ds, "PhotometricInterpretation") or "MONOCHROME2"
    if samples != 1 or frames != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return NOT_GRAYSCALE
    if min(rows, columns) < MIN_SIDE:
        return TOO_SMALL
    return None


def view_position(ds: pydicom.Dataset) -> str:
    """ "frontal", "lateral" or "unknown", from ViewPosition, else the ViewCodeSequence."""
    view = _text(ds, "ViewPosition")
    if view in FRONTAL_VIEWS:
        return "frontal"
    if view in LATERAL_VIEWS:
        return "lateral"
    for item in ds.get("ViewCodeSequence") or []:
        code = str(item.get("CodeValue", "")).strip()
        if code in FRONTAL_CODES:
            return "frontal"
        if code in LATERAL_CODES:
            return "lateral"
    return "unknown"


def read_dicom_header(source: str | Path | bytes) -> pydicom.Dataset | None:
    """A DICOM file's (or upload's) data set with large values left unread, or None when it
    is not DICOM or cannot be parsed: decoding then reports what is wrong with it."""
    from cxrlite.imaging.decode import sniff_format

    try:
        if isinstance(source, bytes | bytearray | memoryview):
            data = bytes(source)
            head, fileobj = data[:132], io.BytesIO(data)
        else:
            with open(source, "rb") as f:
                head = f.read(132)
            fileobj = source
        if sniff_format(head) != "dicom":
            return None
        forced = head[128:132] != b"DICM"
        return pydicom.dcmread(fileobj, defer_size=_HEADER_DEFER, force=forced)
    except Exception:  # unreadable or garbage: the decoder names the problem
        return None


def check_chest_radiograph(source: str | Path | bytes, *, label: str, override: str) -> None:
    """Raise NotChestRadiographError when `source` is DICOM and not a chest radiograph;
    `label` names it in the message ("upload", a path), `override` says how to report anyway."""
    ds = read_dicom_header(source)
    # Only an instance the decoder can read as an image is judged here: a header without pixel
    # data or size (not an image, cut off) gets the decoder's own, more precise error.
    if ds is None or not all(tag in ds for tag in ("Rows", "Columns")):
        return
    reason = chest_radiograph_refusal(ds)
    if reason is not None and reason != NO_PIXEL_DATA:
        raise NotChestRadiographError(label, reason, override)
