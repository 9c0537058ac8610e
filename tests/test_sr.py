"""The draft report as DICOM: the Comprehensive SR and the Encapsulated PDF read back through
pydicom and checked by dciodvfy, a source without its Type 2 attributes, `cxrlite report --sr
--pdf` end to end on the tiny bundle, its one-line errors, and no patient data in the logs."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import ComprehensiveSRStorage, EncapsulatedPDFStorage
from server_testkit import phantom_dicom

from cxrlite.cli import main
from cxrlite.data.labels import CHEXPERT_OBSERVATIONS
from cxrlite.imaging.write import png_bytes
from cxrlite.pacs import sr as sr_module
from cxrlite.pacs.pdf import build_report_pdf, encapsulated_pdf
from cxrlite.pacs.sr import (
    DRAFT_STATEMENT,
    LOCAL_SCHEME,
    OBSERVATION_CODES,
    TYPE2_SOURCE,
    build_report_sr,
    part10_bytes,
    printable,
)

MODEL = {"name": "tiny-test", "bundle_sha256": "ab" * 32, "version": "0.1.0", "license": None}
SENTINEL = "ZZSENTINEL^PATIENT"


def make_report(**changes) -> dict:
    labels = dict.fromkeys(CHEXPERT_OBSERVATIONS, "not mentioned")
    labels.update(
        {"Pleural Effusion": "positive", "Pneumothorax": "negative", "Edema": "uncertain"}
    )
    report = {
        "findings": "Small left pleural effusion. No pneumothorax.",
        "impression": "Small left effusion.",
        "labels": labels,
        "variants": {"vision": "onnx-fp32", "llm": "gguf-f32"},
        "finish_reason": {"findings": "stop", "impression": "stop"},
    }
    return {**report, **changes}


def source_dataset(patient_name: str | None = None) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(phantom_dicom(3, patient_name=patient_name)))


def read_back(ds: pydicom.Dataset) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(part10_bytes(ds)))


def concept(item: pydicom.Dataset) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return code.CodingSchemeDesignator, code.CodeValue


def by_concept(items) -> dict[tuple[str, str], pydicom.Dataset]:
    return {concept(item): item for item in items}


def dciodvfy_errors(path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed"
)


def test_sr_round_trip():
    source = source_dataset()
    sr = read_back(build_report_sr(source, make_report(), model=MODEL))
    assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
    assert (sr.PreliminaryFlag, sr.VerificationFlag, sr.CompletionFlag) == (
        "PRELIMINARY",
        "UNVERIFIED",
        "COMPLETE",
    )
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.PatientID == source.PatientID and sr.PatientName == source.PatientName
    assert sr.AccessionNumber == source.AccessionNumber
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID and sr.SeriesNumber == 990
    assert sr.Manufacturer == "cxrlite" and sr.ManufacturerModelName == "tiny-test"
    schemes = [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    assert LOCAL_SCHEME in schemes
    equipment = [e for e in sr.ContributingEquipmentSequence if e.Manufacturer == "cxrlite"]
    assert list(equipment[0].SoftwareVersions) == ["cxrlite 0.1.0", "ab" * 32]
    assert equipment[0].ManufacturerModelName == "tiny-test"

    assert concept(sr) == ("LN", "18748-4")
    top = by_concept(sr.ContentSequence)
    observer = top[("DCM", "121005")]
    assert observer.RelationshipType == "HAS OBS CONTEXT"
    assert observer.ConceptCodeSequence[0].CodeValue == "121007"  # Device
    assert top[("DCM", "121015")].TextValue == "tiny-test"  # Device Observer Model Name
    assert top[("DCM", "121014")].TextValue == "cxrlite"  # Device Observer Manufacturer
    assert top[("DCM", "121106")].TextValue == DRAFT_STATEMENT
    finding = top[("DCM", "121070")].ContentSequence[0]
    assert finding.TextValue == "Small left pleural effusion. No pneumothorax."
    assert top[("DCM", "121072")].ContentSequence[0].TextValue == "Small left effusion."
    image = top[("DCM", "121324")].ReferencedSOPSequence[0]
    assert image.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert image.ReferencedSOPClassUID == source.SOPClassUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    referenced = evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID

    observations = top[(LOCAL_SCHEME, "CHEXPERT")].ContentSequence
    assert len(observations) == 14 and all(item.ValueType == "CODE" for item in observations)
    coded = by_concept(observations)
    values = {
        name: coded[(code.scheme_designator, code.value)].ConceptCodeSequence[0]
        for name, code in OBSERVATION_CODES.items()
    }
    assert (values["Pleural Effusion"].CodingSchemeDesignator, values["Pleural Effusion"].CodeValue) == ("SCT", "52101004")  # fmt: skip
    assert values["Pneumothorax"].CodeValue == "272519000"  # SCT Absent
    assert (values["Edema"].CodingSchemeDesignator, values["Edema"].CodeValue) == (LOCAL_SCHEME, "UNCERTAIN")  # fmt: skip
    assert values["Cardiomegaly"].CodeMeaning == "Not mentioned"
    assert coded[("SCT", "60046008")].ConceptNameCodeSequence[0].CodeMeaning == "Pleural effusion"


def test_completion_flag_is_partial_when_a_part_is_cut_or_missing():
    source = source_dataset()
    cut = make_report(finish_reason={"findings": "length", "impression": "stop"})
    assert build_report_sr(source, cut, model=MODEL).CompletionFlag == "PARTIAL"
    findings_only = make_report(impression=None, finish_reason={"findings": "stop"})
    sr = read_back(build_report_sr(source, findings_only, model=MODEL))
    assert sr.CompletionFlag == "PARTIAL"
    assert ("DCM", "121072") not in by_concept(sr.ContentSequence)  # no Impressions section


def test_a_source_without_type2_attributes():
    source = source_dataset()
    for keyword in TYPE2_SOURCE:
        source.pop(keyword, None)
    sr = read_back(build_report_sr(source, make_report(findings=""), model=MODEL))
    for keyword in TYPE2_SOURCE:
        assert keyword in sr and not sr[keyword].value
    assert all(keyword not in source for keyword in TYPE2_SOURCE)  # the source is untouched
    finding = by_concept(sr.ContentSequence)[("DCM", "121070")].ContentSequence[0]
    assert finding.TextValue == "(no findings text)"


def test_non_ascii_names_and_text_survive():
    source = source_dataset()
    source.SpecificCharacterSet = "ISO_IR 100"
    source.PatientName = "Müller^Jörg"
    source = pydicom.dcmread(io.BytesIO(part10_bytes(source)))
    sr = read_back(build_report_sr(source, make_report(findings="Épanchement."), model=MODEL))
    assert str(sr.PatientName) == "Müller^Jörg"
    assert by_concept(sr.ContentSequence)[("DCM", "121070")].ContentSequence[0].TextValue == (
        "Épanchement."
    )


def test_control_characters_are_dropped(recwarn):
    report = make_report(findings="Clear\x03 lungs.\x00", impression="Normal.\x1b")
    sr = read_back(build_report_sr(source_dataset(), report, model=MODEL))
    top = by_concept(sr.ContentSequence)
    assert top[("DCM", "121070")].ContentSequence[0].TextValue == "Clear lungs."
    assert top[("DCM", "121072")].ContentSequence[0].TextValue == "Normal."
    build_report_pdf(source_dataset(), report, model=MODEL)
    assert not [w for w in recwarn if "Glyph" in str(w.message)]  # nothing it cannot draw


def test_encapsulated_pdf_round_trip():
    source = source_dataset()
    pdf = build_report_pdf(source, make_report(), model=MODEL)
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    ds = read_back(encapsulated_pdf(source, pdf, model=MODEL))
    assert ds.SOPClassUID == EncapsulatedPDFStorage and ds.Modality == "DOC"
    assert ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == pdf
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SeriesNumber == 991
    assert ds.SourceInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert ds.VerificationFlag == "UNVERIFIED" and ds.BurnedInAnnotation == "NO"


@needs_dciodvfy
def test_dciodvfy_finds_no_errors(tmp_path):
    source = source_dataset()
    bare = source_dataset()
    for keyword in TYPE2_SOURCE:
        bare.pop(keyword, None)
    instances = {
        "sr.dcm": build_report_sr(source, make_report(), model=MODEL),
        "sr-bare.dcm": build_report_sr(bare, make_report(impression=None), model=MODEL),
        "pdf.dcm": encapsulated_pdf(
            source, build_report_pdf(source, make_report(), model=MODEL), model=MODEL
        ),
    }
    errors = {}
    for name, ds in instances.items():
        (tmp_path / name).write_bytes(part10_bytes(ds))
        errors[name] = dciodvfy_errors(tmp_path / name)
    assert errors == dict.fromkeys(instances, []), errors


# --- cxrlite report --sr --pdf --------------------------------------------------------------


@pytest.fixture
def study(tmp_path):
    path = tmp_path / "study.dcm"
    path.write_bytes(phantom_dicom(7, patient_name=SENTINEL))
    return path


def test_report_writes_sr_and_pdf(runtime_built, study, tmp_path, caplog):
    bundle = runtime_built[2]
    sr_path, pdf_path, pdf_dicom = tmp_path / "sr.dcm", tmp_path / "r.pdf", tmp_path / "pdf.dcm"
    args = ["report", str(study), "--bundle", str(bundle), "--json", "--max-tokens", "8"]
    with caplog.at_level(logging.DEBUG):
        first = CliRunner().invoke(
            main, [*args, "--threads", "1", "--sr", str(sr_path), "--pdf", str(pdf_path)]
        )
        second = CliRunner().invoke(main, [*args, "--threads", "1", "--pdf", str(pdf_dicom)])
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    result = json.loads(first.stdout)
    source = pydicom.dcmread(study)
    sr = pydicom.dcmread(sr_path)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    top = by_concept(sr.ContentSequence)
    findings = printable(result["findings"]).strip() or "(no findings text)"  # random weights
    assert top[("DCM", "121070")].ContentSequence[0].TextValue == findings
    assert top[("DCM", "121015")].TextValue == bundle.name  # the model's name: the bundle's
    assert pdf_path.read_bytes().startswith(b"%PDF")
    encapsulated = pydicom.dcmread(pdf_dicom)
    assert encapsulated.EncapsulatedDocument.startswith(b"%PDF")
    assert encapsulated.StudyInstanceUID == source.StudyInstanceUID
    # No patient data in what the command logged or printed.
    for text in (caplog.text, first.output, second.output):
        assert "ZZSENTINEL" not in text
    assert f"wrote {sr_path}" in first.stderr


def test_report_sr_errors_are_one_line(study, tmp_path, monkeypatch):
    bundle = tmp_path / "unused"  # every error comes before the bundle is opened
    bundle.mkdir()
    png = tmp_path / "x.png"
    png.write_bytes(png_bytes(np.zeros((300, 300), np.uint8)))

    def run(*args):
        result = CliRunner().invoke(main, ["report", *map(str, args), "--bundle", str(bundle)])
        assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
        return result.stderr

    assert run(png, "--sr", tmp_path / "o.dcm") == f"Error: {png}: --sr and --pdf need a DICOM input\n"  # fmt: skip
    assert "take one DICOM input, not 2 files" in run(study, png, "--pdf", tmp_path / "o.pdf")
    monkeypatch.setattr(sr_module, "hd", None)
    assert run(study, "--sr", tmp_path / "o.dcm") == (
        'Error: --sr needs the pacs extra: pip install "cxrlite[pacs]"\n'
    )
    with pytest.raises(sr_module.PacsExtraMissing, match=r"cxrlite\[pacs\]"):
        build_report_sr(source_dataset(), make_report(), model=MODEL)


def test_no_patient_data_in_logs_of_the_builders_and_the_check(client, caplog):
    source = source_dataset(patient_name=SENTINEL)
    with caplog.at_level(logging.DEBUG):
        part10_bytes(build_report_sr(source, make_report(), model=MODEL))
        encapsulated_pdf(source, build_report_pdf(source, make_report(), model=MODEL), model=MODEL)
        small = phantom_dicom(9, patient_name=SENTINEL, size=64)
        refused = client.post("/v1/reports", files={"file": (f"{SENTINEL}.dcm", small)})
    assert refused.status_code == 422 and "ZZSENTINEL" not in refused.text
    assert "ZZSENTINEL" not in caplog.text
