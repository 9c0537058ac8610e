"""The draft report as a one-page PDF, and that PDF as a DICOM Encapsulated PDF instance.

`build_report_pdf` draws (matplotlib's PDF backend, no pyplot state, so any thread may call it)
a title, the unverified-draft statement, the findings, the impression, the 14 CheXpert labels
and the model's identity. It names the source image by its modality, view and SOP Instance UID
only: no patient name, identifier or date, so the PDF carries no burned-in identity.
`encapsulated_pdf` wraps it as Encapsulated PDF Storage (1.2.840.10008.5.1.4.1.1.104.1) in the
source's study, a new series (Modality DOC), with pydicom alone: highdicom has no such class.
"""

from __future__ import annotations

import io
import textwrap
from datetime import UTC, datetime
from typing import Any

import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian, generate_uid

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, NOT_MENTIONED, POSITIVE, UNCERTAIN
from cxrlite.pacs.chest import view_position
from cxrlite.pacs.sr import DRAFT_STATEMENT, MANUFACTURER, evidence_of, printable

TITLE = "Chest radiograph: AI draft report"
DOCUMENT_TITLE = "cxrlite AI draft report (unverified)"
PAGE_INCHES = (8.27, 11.69)  # A4
WRAP = 92  # characters a line at 10 pt on the page's width
LINE = 0.0175  # a 10-pt line, as a fraction of the page's height
# Patient and study attributes the Encapsulated PDF copies from its source (Type 2 ones empty
# where the source lacks them: evidence_of).
COPIED = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "StudyDescription",
)


class _Page:
    """A top-down text cursor on one page; past the bottom margin, lines are dropped."""

    def __init__(self, figure: Any) -> None:
        self.figure, self.y, self.full = figure, 0.95, False

    def line(self, text: str, *, size: float = 10, indent: float = 0.0, **style: Any) -> None:
        if self.y < 0.05:
            if not self.full:
                self.figure.text(0.08, 0.03, "(truncated: see the SR)", fontsize=8)
            self.full = True
            return
        self.figure.text(0.08 + indent, self.y, text, fontsize=size, va="top", **style)
        self.y -= LINE * size / 10

    def paragraph(self, text: str, **style: Any) -> None:
        for line in textwrap.wrap(printable(text), WRAP) or [""]:
            self.line(line, **style)

    def gap(self, lines: float = 0.6) -> None:
        self.y -= LINE * lines


def build_report_pdf(
    source: pydicom.Dataset, report: dict[str, Any], *, model: dict[str, Any]
) -> bytes:
    """One A4 page: title, the draft statement, findings, impression, labels, model."""
    from matplotlib.backends.backend_pdf import FigureCanvasPdf
    from matplotlib.figure import Figure

    figure = Figure(figsize=PAGE_INCHES)
    FigureCanvasPdf(figure)
    page = _Page(figure)
    page.line(TITLE, size=16, weight="bold")
    page.gap()
    page.paragraph(DRAFT_STATEMENT, color="darkred", weight="bold")
    modality = str(source.get("Modality", "")).strip() or "?"
    page.line(f"Source image: {modality}, {view_position(source)} view", size=8, color="dimgray")
    page.line(f"SOP Instance UID {source.get('SOPInstanceUID', '?')}", size=8, color="dimgray")
    page.gap()
    page.line("FINDINGS", weight="bold")
    page.paragraph((report.get("findings") or "").strip() or "(no findings text)")
    page.gap()
    page.line("IMPRESSION", weight="bold")
    impression = report.get("impression")
    page.paragraph(
        impression.strip() or "(empty)" if impression is not None else "(none: findings only)"
    )
    page.gap()
    page.line("CHEXPERT LABELS (rule-based labeler on the text above)", weight="bold")
    labels = report.get("labels") or {}
    for name in CHEXPERT_OBSERVATIONS:
        value = labels.get(name, NOT_MENTIONED)
        flagged = value in (POSITIVE, UNCERTAIN)
        page.line(name, indent=0.02, weight="bold" if flagged else "normal")
        page.y += LINE  # the value on the same line
        page.line(value, indent=0.42, weight="bold" if flagged else "normal")
    page.gap()
    page.line("MODEL", weight="bold")
    variants = ", ".join(f"{k} {v}" for k, v in (report.get("variants") or {}).items())
    for text in (
        f"{model['name']} ({variants or 'variants not recorded'})",
        f"bundle sha256 {model['bundle_sha256']}",
        f"cxrlite {model['version']}; licence: {model.get('license') or 'not recorded'}",
        f"generated {datetime.now(UTC).isoformat(timespec='seconds')}",
    ):
        page.line(text, size=9)
    buffer = io.BytesIO()
    metadata = {"Title": DOCUMENT_TITLE, "Creator": f"cxrlite {model['version']}"}
    figure.savefig(buffer, format="pdf", metadata=metadata)
    return buffer.getvalue()


def encapsulated_pdf(
    source: pydicom.Dataset,
    pdf_bytes: bytes,
    *,
    model: dict[str, Any],
    series_number: int = 991,
    instance_number: int = 1,
) -> pydicom.Dataset:
    """`pdf_bytes` as an Encapsulated PDF instance in `source`'s study, in a new series."""
    evidence = evidence_of(source)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EncapsulatedPDFStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    if "SpecificCharacterSet" in evidence:
        ds.SpecificCharacterSet = evidence.SpecificCharacterSet
    now = datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = EncapsulatedPDFStorage, meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate, ds.InstanceCreationTime = (
        now.strftime("%Y%m%d"),
        now.strftime("%H%M%S"),
    )
    for keyword in COPIED:
        if keyword in evidence:
            ds[keyword] = evidence[keyword]
    ds.Modality = "DOC"
    ds.SeriesInstanceUID, ds.SeriesNumber = generate_uid(), series_number
    ds.SeriesDescription = DOCUMENT_TITLE
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model["name"][:64]
    ds.SoftwareVersions = [f"cxrlite {model['version']}", model["bundle_sha256"]]
    ds.ConversionType = "WSD"
    ds.InstanceNumber = instance_number
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "NO"  # the PDF names no patient (build_report_pdf)
    ds.DocumentTitle = DOCUMENT_TITLE
    title = pydicom.Dataset()
    code = codes.LN.DiagnosticImagingReport
    title.CodeValue, title.CodingSchemeDesignator = code.value, code.scheme_designator
    title.CodeMeaning = code.meaning
    ds.ConceptNameCodeSequence = [title]
    ds.VerificationFlag = "UNVERIFIED"
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = evidence.SOPClassUID
    reference.ReferencedSOPInstanceUID = evidence.SOPInstanceUID
    ds.SourceInstanceSequence = [reference]
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    ds.EncapsulatedDocument = pdf_bytes + (b"\0" if len(pdf_bytes) % 2 else b"")
    return ds
