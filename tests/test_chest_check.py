"""The chest-radiograph check: each refusal and the accepted cases, the view, the check on files
and uploads, `cxrlite report`'s one-line refusal and /v1/reports' 422, both with the override."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.dataset import Dataset
from pydicom.uid import (
    DigitalMammographyXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
from server_testkit import phantom_dicom

from cxrlite.cli import main
from cxrlite.imaging.write import dicom_bytes, png_bytes
from cxrlite.pacs import chest
from cxrlite.pacs.chest import (
    MIN_SIDE,
    REFUSALS,
    NotChestRadiographError,
    check_chest_radiograph,
    chest_radiograph_refusal,
    read_dicom_header,
    view_position,
)


def radiograph(size: int = MIN_SIDE, **options) -> Dataset:
    """A DX chest radiograph's data set (dicom_bytes: BodyPartExamined CHEST, view PA)."""
    pixels = np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)
    return pydicom.dcmread(io.BytesIO(dicom_bytes(pixels, **options)))


def changed(ds: Dataset, **values) -> Dataset:
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def secondary_capture(**values) -> Dataset:
    ds = radiograph(modality="OT", view=None)
    assert ds.SOPClassUID == SecondaryCaptureImageStorage
    return changed(changed(ds, BodyPartExamined=None), **values)


REFUSED = {
    chest.NO_PIXEL_DATA: lambda: changed(radiograph(), PixelData=None),
    chest.WRONG_MODALITY: lambda: changed(radiograph(), Modality="CT"),
    "OT without secondary capture": lambda: changed(radiograph(), Modality="OT"),
    chest.WRONG_SOP_CLASS: lambda: changed(
        radiograph(), SOPClassUID=DigitalMammographyXRayImageStorageForPresentation
    ),
    chest.NOT_CHEST: lambda: changed(radiograph(), BodyPartExamined="HAND"),
    chest.SC_WITHOUT_CHEST: lambda: secondary_capture(StudyDescription="XR HAND 2 VIEWS"),
    chest.NOT_GRAYSCALE: lambda: pydicom.dcmread(
        io.BytesIO(dicom_bytes(np.zeros((MIN_SIDE, MIN_SIDE, 3), np.uint8), photometric="RGB"))
    ),
    "multi-frame": lambda: pydicom.dcmread(
        io.BytesIO(dicom_bytes(np.zeros((2, MIN_SIDE, MIN_SIDE), np.uint8), modality="DX"))
    ),
    chest.TOO_SMALL: lambda: radiograph(size=MIN_SIDE - 1),
}
EXPECTED = {
    "OT without secondary capture": chest.WRONG_MODALITY,
    "multi-frame": chest.WRONG_SOP_CLASS,  # dicom_bytes writes frames as multi-frame SC
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_each_refusal(case):
    assert chest_radiograph_refusal(REFUSED[case]()) == EXPECTED.get(case, case)


def test_a_multi_frame_radiograph_is_not_a_single_frame_image():
    ds = changed(radiograph(), NumberOfFrames=2)
    assert chest_radiograph_refusal(ds) == chest.NOT_GRAYSCALE


def test_reasons_are_a_fixed_table_with_metric_codes():
    assert len(set(REFUSALS.values())) == len(REFUSALS) == 7
    assert all(code.replace("_", "").isalpha() and code.islower() for code in REFUSALS.values())


@pytest.mark.parametrize(
    "build",
    [
        lambda: radiograph(),
        lambda: radiograph(modality="CR"),
        lambda: changed(radiograph(), SOPClassUID=DigitalXRayImageStorageForProcessing),
        lambda: changed(radiograph(), BodyPartExamined=None),
        lambda: changed(radiograph(), BodyPartExamined=""),
        lambda: changed(radiograph(), BodyPartExamined="thorax"),
        lambda: changed(radiograph(), BodyPartExamined="LUNG"),
        lambda: changed(radiograph(photometric="MONOCHROME1"), ViewPosition=None),
        lambda: secondary_capture(StudyDescription="XR CHEST PA AND LATERAL"),
        lambda: secondary_capture(SeriesDescription="Thorax"),
        lambda: secondary_capture(ProtocolName="CXR portable"),
        lambda: secondary_capture(ViewPosition="LL"),
        lambda: secondary_capture(BodyPartExamined="CHEST"),
        lambda: changed(radiograph(modality="CR"), SOPClassUID=SecondaryCaptureImageStorage),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # lower case, as found in the wild
def test_accepted(build):
    assert chest_radiograph_refusal(build()) is None


def test_view_position():
    assert view_position(radiograph()) == "frontal"
    assert view_position(changed(radiograph(), ViewPosition="AP")) == "frontal"
    assert view_position(changed(radiograph(), ViewPosition="LATERAL")) == "lateral"
    ds = changed(radiograph(), ViewPosition=None)
    assert view_position(ds) == "unknown"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "399198007",
        "SCT",
        "right lateral",
    )
    ds.ViewCodeSequence = [code]
    assert view_position(ds) == "lateral"


def test_check_on_files_and_bytes(tmp_path):
    small = phantom_dicom(1, size=64)
    with pytest.raises(NotChestRadiographError) as refused:
        check_chest_radiograph(small, label="upload", override="do X")
    assert str(refused.value) == "upload: not a chest radiograph (image too small); do X"
    assert refused.value.code == "not_chest_radiograph" and refused.value.http_status == 422
    path = tmp_path / "ok.dcm"
    path.write_bytes(phantom_dicom(1))
    check_chest_radiograph(path, label=str(path), override="do X")  # accepted
    # Not judged here, left to the decoder's precise error: PNG, garbage, a cut-off header, a
    # DICOM without pixel data.
    check_chest_radiograph(png_bytes(np.zeros((8, 8), np.uint8)), label="u", override="x")
    check_chest_radiograph(b"\x08\x00" + bytes(30), label="u", override="x")
    check_chest_radiograph(small[:200], label="u", override="x")
    ds = read_dicom_header(small)
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    check_chest_radiograph(buffer.getvalue(), label="u", override="x")
    assert read_dicom_header(b"not dicom at all") is None


# --- cxrlite report and /v1/reports ---------------------------------------------------------


def test_cli_refuses_a_non_chest_dicom_before_loading(tmp_path):
    study = tmp_path / "hand.dcm"
    ds = pydicom.dcmread(io.BytesIO(phantom_dicom(2)))
    ds.BodyPartExamined = "HAND"
    ds.save_as(study, enforce_file_format=True)
    fake_bundle = tmp_path / "no-bundle"  # never opened: the refusal comes first
    fake_bundle.mkdir()
    result = CliRunner().invoke(main, ["report", str(study), "--bundle", str(fake_bundle)])
    assert result.exit_code == 1
    assert result.stderr == (
        f"Error: {study}: not a chest radiograph (body part not chest); "
        "pass --allow-non-chest to report anyway\n"
    )


def test_cli_override_reports_anyway(runtime_built, tmp_path):
    study = tmp_path / "small.dcm"
    study.write_bytes(phantom_dicom(2, size=64))
    args = ["report", str(study), "--bundle", str(runtime_built[2]), "--max-tokens", "4"]
    refused = CliRunner().invoke(main, [*args, "--threads", "1"])
    assert refused.exit_code == 1 and "(image too small)" in refused.stderr
    result = CliRunner().invoke(main, [*args, "--threads", "1", "--allow-non-chest"])
    assert result.exit_code == 0, result.output
    assert "FINDINGS: " in result.stdout


def test_http_422_with_the_reason_and_the_override(client):
    small = phantom_dicom(5, size=64)
    files = {"file": ("x.dcm", small, "application/dicom")}
    refused = client.post("/v1/reports", files=files, data={"max_tokens": "4"})
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "not_chest_radiograph"
    assert error["message"] == (
        "upload: not a chest radiograph (image too small); "
        "send the form field allow_non_chest=true to report anyway"
    )
    allowed = client.post(
        "/v1/reports", files=files, data={"max_tokens": "4", "allow_non_chest": "true"}
    )
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["object"] == "report"
