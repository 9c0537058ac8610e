"""The draft report as a DICOM Comprehensive SR, filed into the study of the image it reads.

`build_report_sr(source, report, model=...)` takes the source image's data set (pixels are not
needed), what `Runtime.report()` returned and `model_identity(bundle)`, and builds (highdicom's
ComprehensiveSR, SOP class 1.2.840.10008.5.1.4.1.1.88.33) an instance in the source's study
(same StudyInstanceUID; patient and study attributes copied by highdicom) and a new series:

  CONTAINER  LN 18748-4 "Diagnostic Imaging Report"
    HAS OBS CONTEXT  observer type DEVICE: UID, name, manufacturer "cxrlite", model name
    CONTAINS  TEXT DCM 121106 "Comment": the unverified-draft statement (`DRAFT_STATEMENT`)
    CONTAINS  CONTAINER DCM 121070 "Findings" > TEXT DCM 121071 "Finding"
    CONTAINS  CONTAINER DCM 121072 "Impressions" > TEXT DCM 121073 "Impression" (if written)
    CONTAINS  CONTAINER 99CXRLITE "CheXpert observations" > 14 CODE items (`OBSERVATION_CODES`)
              valued SCT "Present" / SCT "Absent" / 99CXRLITE "Uncertain" / "Not mentioned"
    CONTAINS  IMAGE DCM 121324 "Source image": the source instance (also the SR's evidence)

Flags: PreliminaryFlag PRELIMINARY, VerificationFlag UNVERIFIED, CompletionFlag COMPLETE only
when every part ran to its end and there is an impression (else PARTIAL). The equipment is
Manufacturer "cxrlite", ManufacturerModelName the model, SoftwareVersions cxrlite's version;
ContributingEquipmentSequence adds cxrlite, the model and the bundle's sha256. SNOMED CT and DCM
codes are used where pydicom's code dictionary has them; the rest are local (`LOCAL_SCHEME`,
declared in CodingSchemeIdentificationSequence). Nothing here logs.
"""

from __future__ import annotations

import io
import unicodedata
from typing import Any

import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

import cxrlite
from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, NEGATIVE, POSITIVE, UNCERTAIN
from cxrlite.errors import CxrliteError

try:
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
except ImportError:  # the pacs extra is missing: build_report_sr says what to install
    hd = None

PACS_EXTRA = 'pip install "cxrlite[pacs]"'
MANUFACTURER = "cxrlite"
DRAFT_STATEMENT = (
    "Unverified AI-generated draft; not for diagnosis without review by a radiologist."
)
LOCAL_SCHEME = "99CXRLITE"


def _local(value: str, meaning: str) -> Code:
    return Code(value, LOCAL_SCHEME, meaning)


REPORT_TITLE = codes.LN.DiagnosticImagingReport  # 18748-4, CID 7000
OBSERVATIONS_TITLE = _local("CHEXPERT", "CheXpert observations")
# The 14 CheXpert observations: SNOMED CT where the concept is the same, else local codes.
OBSERVATION_CODES: dict[str, Code] = {
    "No Finding": _local("NO-FINDING", "No Finding"),
    "Enlarged Cardiomediastinum": _local("ENL-CARDIOMED", "Enlarged Cardiomediastinum"),
    "Cardiomegaly": _local("CARDIOMEGALY", "Cardiomegaly"),
    "Lung Opacity": _local("LUNG-OPACITY", "Lung Opacity"),
    "Lung Lesion": _local("LUNG-LESION", "Lung Lesion"),
    "Edema": codes.SCT.PulmonaryEdema,
    "Consolidation": _local("CONSOLIDATION", "Consolidation"),
    "Pneumonia": _local("PNEUMONIA", "Pneumonia"),
    "Atelectasis": _local("ATELECTASIS", "Atelectasis"),
    "Pneumothorax": codes.SCT.Pneumothorax,
    "Pleural Effusion": codes.SCT.PleuralEffusion,
    "Pleural Other": _local("PLEURAL-OTHER", "Pleural Other"),
    "Fracture": _local("FRACTURE", "Fracture"),
    "Support Devices": _local("SUPPORT-DEVICES", "Support Devices"),
}
assert tuple(OBSERVATION_CODES) == CHEXPERT_OBSERVATIONS
# A label value -> its coded value; anything else is "not mentioned".
VALUE_CODES: dict[str, Code] = {
    POSITIVE: codes.SCT.Present,  # 52101004, CID 240
    NEGATIVE: codes.SCT.Absent,  # 272519000, CID 240
    UNCERTAIN: _local("UNCERTAIN", "Uncertain"),
}
NOT_MENTIONED_CODE = _local("NOT-MENTIONED", "Not mentioned")
# Type 2 attributes highdicom reads from the source: present (empty) in the copy it is given.
TYPE2_SOURCE = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
)


class PacsExtraMissing(CxrliteError, ImportError):
    """DICOM SR output needs highdicom (the `pacs` extra)."""


def model_identity(bundle: Any) -> dict[str, Any]:
    """{name, bundle_sha256, version, license} of a cxrlite.bundle.Bundle: a published model's
    name and licence from its provenance, else the bundle folder's name (the served model id);
    the sha256 of manifest.json, which lists every file's sha256; this cxrlite's version."""
    from cxrlite.bundle import MANIFEST_FILE, sha256_file

    record = bundle.provenance or {}
    return {
        "name": record.get("model") or bundle.path.name,
        "bundle_sha256": sha256_file(bundle.path / MANIFEST_FILE),
        "version": cxrlite.__version__,
        "license": record.get("license"),
    }


def part10_bytes(ds: pydicom.Dataset) -> bytes:
    """A built instance (SR, Encapsulated PDF) as DICOM Part 10 file bytes."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def printable(text: str) -> str:
    """`text` without control characters but line breaks and tabs: a UT value may hold no
    others, and a small or random model can generate them."""
    return "".join(c for c in text if c in "\n\r\t" or unicodedata.category(c)[0] != "C")


def _lo(text: str) -> str:
    """A value that fits a LO element (64 characters)."""
    return text if len(text) <= 64 else text[:61] + "..."


def evidence_of(source: pydicom.Dataset) -> pydicom.Dataset:
    """A copy of `source` without pixel or overlay data (values shared, not deep-copied), with
    every Type 2 attribute highdicom reads present, empty where the source has none."""
    light = pydicom.Dataset()
    for tag in source.keys():
        if tag.group == 0x7FE0 or (tag.group & 0xFF00 == 0x6000 and tag.element == 0x3000):
            continue
        light[tag] = source[tag]
    for keyword in TYPE2_SOURCE:
        if keyword not in light:
            setattr(light, keyword, None)
    return light


def _text_item(name: Code, text: str | None, empty: str) -> Any:
    return hd.sr.TextContentItem(
        name,
        printable(text or "").strip() or empty,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _section(title: Code, items: list[Any]) -> Any:
    container = hd.sr.ContainerContentItem(
        title, is_content_continuous=False, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _content(source: pydicom.Dataset, report: dict[str, Any], model: dict[str, Any]) -> Any:
    contains = hd.sr.RelationshipTypeValues.CONTAINS
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[MANUFACTURER, model["name"], model["bundle_sha256"]]),
        name=_lo(f"{MANUFACTURER} {model['name']}"),
        manufacturer_name=MANUFACTURER,
        model_name=_lo(model["name"]),
    )
    observer = hd.sr.ObserverContext(codes.cid270.Device, device)
    items = [*observer, _text_item(codes.DCM.Comment, DRAFT_STATEMENT, DRAFT_STATEMENT)]
    findings = _text_item(codes.DCM.Finding, report.get("findings"), "(no findings text)")
    items.append(_section(codes.DCM.Findings, [findings]))
    if report.get("impression") is not None:
        impression = _text_item(codes.DCM.Impression, report["impression"], "(no impression)")
        items.append(_section(codes.DCM.Impressions, [impression]))
    labels = report.get("labels") or {}
    observations = [
        hd.sr.CodeContentItem(
            code,
            VALUE_CODES.get(labels.get(name), NOT_MENTIONED_CODE),
            relationship_type=contains,
        )
        for name, code in OBSERVATION_CODES.items()
    ]
    items.append(_section(OBSERVATIONS_TITLE, observations))
    items.append(
        hd.sr.ImageContentItem(
            codes.DCM.SourceImage,
            source.SOPClassUID,
            source.SOPInstanceUID,
            relationship_type=contains,
        )
    )
    root = hd.sr.ContainerContentItem(REPORT_TITLE, is_content_continuous=False)
    root.ContentSequence = hd.sr.ContentSequence(items)
    return root


def is_complete(report: dict[str, Any]) -> bool:
    """Every generated part ran to its end (not cut by max_tokens or a cancel), and there is
    an impression: the report is COMPLETE; otherwise PARTIAL."""
    reasons = report.get("finish_reason") or {}
    finished = all(reason in (None, "stop") for reason in reasons.values())
    return (
        finished
        and bool((report.get("findings") or "").strip())
        and bool((report.get("impression") or "").strip())
    )


def build_report_sr(
    source: pydicom.Dataset,
    report: dict[str, Any],
    *,
    model: dict[str, Any],
    series_number: int = 990,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """The Comprehensive SR of `report` (Runtime.report()'s dict) on the image `source`, by the
    model `model` (model_identity()); a new series in the source's study. Needs highdicom."""
    if hd is None:
        raise PacsExtraMissing(f"DICOM SR output needs the pacs extra: {PACS_EXTRA}")
    evidence = evidence_of(source)
    variants = report.get("variants") or {}
    described = ", ".join(f"{k} {v}" for k, v in variants.items())
    equipment = hd.ContributingEquipment(
        MANUFACTURER,
        codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(model["name"]),
        software_versions=[f"cxrlite {model['version']}", model["bundle_sha256"]],
        contribution_description=_lo(
            f"AI draft report ({described})" if described else "AI draft report"
        ),
    )
    scheme = CodingSchemeIdentificationItem(
        LOCAL_SCHEME, name="cxrlite local codes", responsible_organization=MANUFACTURER
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[evidence],
        content=_content(evidence, report, model),
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=is_complete(report),
        is_final=False,
        is_verified=False,
        contributing_equipment=[equipment],
        coding_schemes=[scheme],
        manufacturer_model_name=_lo(model["name"]),
        software_versions=f"cxrlite {model['version']}",
        series_description="cxrlite AI draft report (unverified)",
        specific_character_set="ISO_IR 192",
    )
    return sr
