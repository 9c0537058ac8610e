"""Dataset loaders on tiny fixtures written in the exact published layouts."""

from __future__ import annotations

import csv
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrlite.data.datasets import (
    LOADERS,
    DatasetError,
    detect_layout,
    load_dataset,
    padchest_chexpert,
    patient_split,
)
from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
    Effusion,
    StudyLabels,
)
from cxrlite.data.records import Study
from cxrlite.eval.labeler import label_report
from cxrlite.eval.sections import findings_and_impression, report_sections


def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(path, "JPEG")


def _png(path: Path, bits16: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if bits16:
        Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)
    else:
        Image.new("L", (8, 8), 128).save(path)


def _csv(path: Path, header: list[str], rows: list[dict[str, str]], gz: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------- MIMIC-CXR-JPG

MIMIC_META = [
    "dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
    "Rows", "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning",
]  # fmt: skip
MIMIC_LABELS = ["subject_id", "study_id", *sorted(CHEXPERT_OBSERVATIONS)]
# Real reports keep a leading space on every line, blank lines included.
MIMIC_REPORT = "\n".join(
    [
        "                                 FINAL REPORT",
        " EXAMINATION:  CHEST (PA AND LAT)",
        " ",
        " INDICATION:  ___F with new onset ascites  // eval for infection",
        " ",
        " TECHNIQUE:  Chest PA and lateral",
        " ",
        " COMPARISON:  None.",
        " ",
        " FINDINGS:",
        " ",
        " There is no focal consolidation, pleural effusion or pneumothorax.  The",
        " cardiomediastinal silhouette is normal.",
        " LUNGS: Clear.",
        " ",
        " IMPRESSION:",
        " ",
        " No acute cardiopulmonary process.",
        "",
    ]
)


@pytest.fixture
def mimic_root(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    images = [  # dicom, subject, study, view, split, file written
        ("d1", "10000032", "50414267", "PA", "train", True),
        ("d2", "10000032", "50414267", "LATERAL", "train", True),
        ("d3", "10000032", "53189527", "AP", "validate", True),
        ("d4", "11000011", "51111111", "PA", "test", True),
        ("d5", "11000011", "51111111", "AP", "test", False),  # listed, not downloaded
    ]
    meta, split = [], []
    for dicom, subject, study, view, which, written in images:
        meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                     "ViewPosition": view, "Rows": "3056", "Columns": "2544"})  # fmt: skip
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject, "split": which})
        if written:
            _jpg(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
    _csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", MIMIC_META, meta, gz=True)
    _csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
         split, gz=True)  # fmt: skip
    labels = [
        {"subject_id": "10000032", "study_id": "50414267", "No Finding": "1.0"},
        {"subject_id": "10000032", "study_id": "53189527", "Pleural Effusion": "-1.0",
         "Cardiomegaly": "1.0", "Pneumothorax": "0.0"},
    ]  # fmt: skip
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", MIMIC_LABELS, labels, gz=True)
    (root / "files" / "p10" / "p10000032" / "s50414267.txt").write_text(MIMIC_REPORT)
    # The second report sits in an unpacked mimic-cxr-reports archive beside the images.
    other = root / "mimic-cxr-reports" / "files" / "p10" / "p10000032" / "s53189527.txt"
    other.parent.mkdir(parents=True)
    other.write_text(" WET READ: ___ 10:00 AM\n\n IMPRESSON:  Small left effusion.\n")
    return root


def test_mimic_loads_frontal_images_with_official_split_labels_and_reports(mimic_root, caplog):
    with caplog.at_level(logging.WARNING):
        studies = load_dataset("mimic-cxr-jpg", mimic_root)
    by_id = {s.id: s for s in studies}
    assert sorted(by_id) == ["s50414267/d1", "s51111111/d4", "s53189527/d3"]
    assert "skipped 1 rows (missing image)" in caplog.text
    s1, s3, s4 = by_id["s50414267/d1"], by_id["s53189527/d3"], by_id["s51111111/d4"]
    assert (s1.split, s3.split, s4.split) == ("train", "validate", "test")
    assert (s1.view, s3.view, s4.view) == ("PA", "AP", "PA")
    assert s1.source == "mimic-cxr-jpg" and s1.sex is None and s1.age is None
    assert Path(s1.image).is_absolute() and Path(s1.image).is_file()
    assert s1.image.endswith("files/p10/p10000032/s50414267/d1.jpg")
    assert s1.findings == (
        "There is no focal consolidation, pleural effusion or pneumothorax. The "
        "cardiomediastinal silhouette is normal. LUNGS: Clear."
    )
    assert s1.impression == "No acute cardiopulmonary process."
    assert s3.findings is None and s3.impression == "Small left effusion."
    assert s4.findings is None and s4.impression is None and s4.chexpert == {}
    assert s1.chexpert["No Finding"] == POSITIVE
    assert s3.chexpert["Pleural Effusion"] == UNCERTAIN
    assert s3.chexpert["Cardiomegaly"] == POSITIVE
    assert s3.chexpert["Pneumothorax"] == NEGATIVE
    assert s3.chexpert["Edema"] == NOT_MENTIONED
    assert len(s3.chexpert) == 14


def test_mimic_all_views_and_missing_metadata(mimic_root, tmp_path):
    studies = load_dataset("mimic-cxr-jpg", mimic_root, views=None, check_images=False)
    assert sorted(s.view for s in studies) == ["AP", "AP", "LATERAL", "PA", "PA"]
    (mimic_root / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(DatasetError, match=r"mimic-cxr-2\.0\.0-metadata\.csv\(\.gz\) not found"):
        load_dataset("mimic-cxr-jpg", mimic_root)


def test_corrupt_gz_and_missing_columns_name_the_file(mimic_root):
    path = mimic_root / "mimic-cxr-2.0.0-metadata.csv.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match=r"metadata\.csv\.gz: cannot read CSV"):
        load_dataset("mimic-cxr-jpg", mimic_root)
    _csv(path, ["dicom_id", "subject_id", "study_id"], [], gz=True)
    with pytest.raises(
        DatasetError, match=r"metadata\.csv\.gz: missing columns \['ViewPosition'\]"
    ):
        load_dataset("mimic-cxr-jpg", mimic_root)


def test_report_section_parser_normalizes_headers():
    sections = report_sections(MIMIC_REPORT)
    assert sections["examination"] == "CHEST (PA AND LAT)"
    assert sections["comparison"] == "None."
    assert sections["technique"] == "Chest PA and lateral"
    assert findings_and_impression("CHEST, PA AND LATERAL: Lungs clear.\nCONCLUSION: Normal.") == (
        "Lungs clear.",
        "Normal.",
    )
    # Mixed-case known headers (generic JSONL reports) count; prose before a colon does not.
    assert findings_and_impression("Findings: Heart normal. Note: stable\nImpression: ok") == (
        "Heart normal. Note: stable",
        "ok",
    )
    assert findings_and_impression("no sections here") == (None, None)


# ---------------------------------------------------------------- CheXpert

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_OBSERVATIONS]


@pytest.fixture
def chexpert_root(tmp_path: Path) -> Path:
    root = tmp_path / "chexpert"
    data = root / "CheXpert-v1.0-small"
    train = [
        {"Path": "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
         "Sex": "Female", "Age": "68", "Frontal/Lateral": "Frontal", "AP/PA": "AP",
         "No Finding": "1.0", "Pneumothorax": "0.0", "Support Devices": "1.0"},
        {"Path": "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg",
         "Sex": "Male", "Age": "87", "Frontal/Lateral": "Frontal", "AP/PA": "PA",
         "Cardiomegaly": "-1.0", "Lung Opacity": "1.0", "Edema": "-1.0", "Fracture": "1.0"},
        {"Path": "CheXpert-v1.0-small/train/patient00002/study2/view2_lateral.jpg",
         "Sex": "Male", "Age": "87", "Frontal/Lateral": "Lateral", "AP/PA": ""},
        {"Path": "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg",
         "Sex": "Unknown", "Age": "0", "Frontal/Lateral": "Frontal", "AP/PA": "AP",
         "Edema": "2.0"},  # not a CheXpert value: skipped
    ]  # fmt: skip
    valid = [
        {"Path": "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
         "Sex": "Male", "Age": "73", "Frontal/Lateral": "Frontal", "AP/PA": "AP",
         **{obs: "0.0" for obs in CHEXPERT_OBSERVATIONS}, "Cardiomegaly": "1.0"},
    ]  # fmt: skip
    _csv(data / "train.csv", CHEXPERT_HEADER, train)
    _csv(data / "valid.csv", CHEXPERT_HEADER, valid)
    for row in train + valid:
        _jpg(root / row["Path"])
    return root


def test_chexpert_loads_splits_demographics_and_labels(chexpert_root, caplog):
    with caplog.at_level(logging.WARNING):
        studies = load_dataset("chexpert", chexpert_root)
    assert "skipped 1 rows (bad label value)" in caplog.text
    by_id = {s.id: s for s in studies}
    assert sorted(by_id) == [
        "train/patient00001/study1/view1_frontal",
        "train/patient00002/study2/view1_frontal",
        "valid/patient64541/study1/view1_frontal",
    ]
    a = by_id["train/patient00001/study1/view1_frontal"]
    b = by_id["train/patient00002/study2/view1_frontal"]
    v = by_id["valid/patient64541/study1/view1_frontal"]
    assert (a.split, b.split, v.split) == ("train", "train", "validate")
    assert (a.view, b.view, v.view) == ("AP", "PA", "AP")
    assert (a.sex, a.age, b.sex, b.age) == ("F", 68, "M", 87)
    assert a.findings is None and a.impression is None and a.source == "chexpert"
    assert a.chexpert["No Finding"] == POSITIVE and a.chexpert["Pneumothorax"] == NEGATIVE
    assert a.chexpert["Cardiomegaly"] == NOT_MENTIONED
    assert b.chexpert["Cardiomegaly"] == UNCERTAIN and b.chexpert["Fracture"] == POSITIVE
    assert v.chexpert["Cardiomegaly"] == POSITIVE and v.chexpert["Edema"] == NEGATIVE
    assert Path(a.image).is_file()
    # The dataset folder itself works as the root too, and lateral images load on request.
    inner = load_dataset("chexpert", chexpert_root / "CheXpert-v1.0-small", views=None)
    assert len(inner) == 4 and {s.view for s in inner} == {"AP", "PA", "LATERAL"}


def test_chexpert_missing_column_and_missing_csv(chexpert_root, tmp_path):
    train = chexpert_root / "CheXpert-v1.0-small" / "train.csv"
    _csv(train, [c for c in CHEXPERT_HEADER if c != "AP/PA"], [])
    with pytest.raises(DatasetError, match=r"train\.csv: missing columns \['AP/PA'\]"):
        load_dataset("chexpert", chexpert_root)
    with pytest.raises(DatasetError, match="no CheXpert train.csv / valid.csv"):
        LOADERS["chexpert"](tmp_path / "empty")


# ---------------------------------------------------------------- IU X-ray / Open-I

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="{uid}"/>
   <pmcId id="{n}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Positive TB test</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH><major>normal</major></MeSH>
   {images}
</eCitation>
"""


def _iu_images(ids: list[str]) -> str:
    return "\n".join(
        f'<parentImage id="{i}"><figureId>F1</figureId><caption>Xray Chest PA and Lateral'
        f"</caption></parentImage>"
        for i in ids
    )


@pytest.fixture
def iu_root(tmp_path: Path) -> Path:
    root = tmp_path / "iu"
    reports = root / "ecgen-radiology"
    reports.mkdir(parents=True)
    one = ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]
    reports.joinpath("1.xml").write_text(
        IU_XML.format(
            uid="CXR1",
            n=1,
            findings="The cardiac silhouette and mediastinum size are within normal limits. "
            "There is no pulmonary edema.",
            impression="Normal chest x-XXXX.",
            images=_iu_images(one),
        )
    )
    reports.joinpath("2.xml").write_text(
        IU_XML.format(
            uid="CXR2",
            n=2,
            findings="\n   Borderline cardiomegaly.\n   No pneumothorax. ",
            impression="",
            images=_iu_images(["CXR2_IM-0652-1001"]),
        )
    )
    reports.joinpath("3.xml").write_text("<eCitation><uId id='CXR3'/>")  # truncated
    for image_id in [*one, "CXR2_IM-0652-1001"]:
        _png(root / "NLMCXR_png" / f"{image_id}.png")
    return root


def test_iu_xray_loads_one_study_per_image_with_report_sections(iu_root, caplog):
    with caplog.at_level(logging.WARNING):
        studies = load_dataset("iu-xray", iu_root)
    assert "skipped 1 rows (unparseable XML)" in caplog.text
    by_id = {s.id: s for s in studies}
    assert sorted(by_id) == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001"]
    a, b, c = (by_id[k] for k in sorted(by_id))
    assert (
        a.findings.startswith("The cardiac silhouette") and a.impression == "Normal chest x-XXXX."
    )
    assert c.findings == "Borderline cardiomegaly. No pneumothorax." and c.impression is None
    # Both images of one report share a split (hashed from the report id).
    assert a.split == b.split == patient_split("CXR1") and c.split == patient_split("CXR2")
    assert a.view is None and a.source == "iu-xray" and a.image.endswith("CXR1_1_IM-0001-3001.png")
    # IU has no label table: the labels are the report labeler's reading of the report.
    assert a.chexpert == dict(label_report(f"{a.findings} {a.impression}"))
    assert len(a.chexpert) == 14 and a.chexpert["Edema"] == NEGATIVE


# ---------------------------------------------------------------- PadChest

PADCHEST_HEADER = [
    "", "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection", "Pediatric",
    "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
    "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM",
    "ExposureTime", "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel", "Labels",
    "Localizations", "LabelsLocalizationsBySentence", "labelCUIS", "LocalizationsCUIS",
]  # fmt: skip


@pytest.fixture
def padchest_root(tmp_path: Path) -> Path:
    root = tmp_path / "padchest"
    rows = [
        ("img_a.png", "0", "20140915", "st1", "pt1", "1930.0", "F", "PA", "['normal']"),
        ("img_b.png", "1", "20120101", "st2", "pt2", "1955.0", "M", "AP_horizontal",
         "['pleural effusion', ' cardiomegaly', 'aortic elongation']"),
        ("img_c.png", "1", "20120101", "st2", "pt2", "1955.0", "M", "L", "['pleural effusion']"),
        ("img_d.png", "0", "20100101", "st3", "pt3", "", "O", "PA", "['nodule', 'loculated"),
    ]  # fmt: skip
    dict_rows = []
    for i, (image, folder, date, study, patient, birth, sex, projection, labels) in enumerate(rows):
        dict_rows.append({"": str(i), "ImageID": image, "ImageDir": folder,
                          "StudyDate_DICOM": date, "StudyID": study, "PatientID": patient,
                          "PatientBirth": birth, "PatientSex_DICOM": sex,
                          "Projection": projection, "Labels": labels,
                          "Report": "cardiomegalia ."})  # fmt: skip
        _png(root / folder / image, bits16=True)
    _csv(root / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", PADCHEST_HEADER, dict_rows)
    return root


def test_padchest_maps_labels_views_and_age(padchest_root, caplog):
    with caplog.at_level(logging.WARNING):
        studies = load_dataset("padchest", padchest_root)
    assert "skipped 1 rows (unparseable Labels)" in caplog.text
    a, b = studies
    assert (a.id, b.id) == ("img_a", "img_b")
    assert (a.view, b.view) == ("PA", "AP")
    assert (a.sex, a.age, b.sex, b.age) == ("F", 84, "M", 57)
    assert a.split == patient_split("pt1") and b.split == patient_split("pt2")
    assert a.findings is None and a.source == "padchest"
    assert a.image.endswith("padchest/0/img_a.png")
    assert a.chexpert["No Finding"] == POSITIVE and a.chexpert["Pleural Effusion"] == NEGATIVE
    assert a.chexpert["Support Devices"] == NOT_MENTIONED
    assert b.chexpert["Pleural Effusion"] == POSITIVE and b.chexpert["Cardiomegaly"] == POSITIVE
    assert b.chexpert["No Finding"] == NEGATIVE and b.chexpert["Edema"] == NOT_MENTIONED


def test_padchest_label_table():
    labels = padchest_chexpert(["hydropneumothorax", "NSG tube", "scoliosis"])
    assert labels["Pneumothorax"] == labels["Pleural Effusion"] == POSITIVE
    assert labels["Support Devices"] == POSITIVE
    assert sum(v == POSITIVE for v in labels.values()) == 3


def test_padchest_missing_csv_names_it(tmp_path):
    with pytest.raises(DatasetError, match="PADCHEST_chest_x_ray_images_labels_160K"):
        load_dataset("padchest", tmp_path)


# ---------------------------------------------------------------- JSONL and phantoms


def test_generic_jsonl_schema(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    rows = [
        {"id": "a", "image": "img/a.png", "report": "FINDINGS: Heart enlarged.\nIMPRESSION: CM.",
         "labels": {"Cardiomegaly": 1, "Edema": -1, "Pneumothorax": 0, "Fracture": None},
         "split": "val", "sex": "female", "age": 44, "view": "pa"},
        {"image": "img/b.png", "findings": "Clear.", "patient_id": "p9",
         "labels": {"Pleural Effusion": "negative"}},
    ]  # fmt: skip
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = load_dataset("jsonl", tmp_path)
    assert (a.id, a.split, a.sex, a.age, a.view) == ("a", "validate", "F", 44, "PA")
    assert (a.findings, a.impression) == ("Heart enlarged.", "CM.")
    assert a.chexpert == {"Cardiomegaly": POSITIVE, "Edema": UNCERTAIN,
                          "Pneumothorax": NEGATIVE, "Fracture": NOT_MENTIONED}  # fmt: skip
    assert (b.id, b.split, b.findings, b.impression) == (
        "img/b",
        patient_split("p9"),
        "Clear.",
        None,
    )
    assert b.image == str((tmp_path / "img" / "b.png").resolve())
    with open(tmp_path / "data.jsonl", "a") as f:
        f.write(json.dumps({"image": "img/a.png", "labels": {"Cardiomegaly": 7}}) + "\n")
    with pytest.raises(DatasetError, match=r"data\.jsonl: record 3: label value 7"):
        load_dataset("jsonl", tmp_path)


def test_phantom_manifest_resolves_images_next_to_it(tmp_path):
    labels = StudyLabels(view="PA", sex="M", age=50, ctr=0.45, effusion=Effusion("left", "small"))
    study = Study(id="ph0", image="images/ph0.png", split="test", source="phantom",
                  findings="Small left effusion.", chexpert={"Pleural Effusion": POSITIVE},
                  view="PA", sex="M", age=50, labels=labels)  # fmt: skip
    _png(tmp_path / "images" / "ph0.png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps(study.to_dict()) + "\n")
    assert detect_layout(tmp_path) == "phantom"
    (loaded,) = load_dataset("auto", tmp_path)
    assert loaded.labels == labels and loaded.findings == "Small left effusion."
    assert loaded.image == str((tmp_path / "images" / "ph0.png").resolve())
    (tmp_path / "images" / "ph0.png").unlink()
    with pytest.raises(DatasetError, match="no studies could be loaded"):
        load_dataset("phantom", tmp_path)


# ---------------------------------------------------------------- layout detection, splits


def test_detect_layout(mimic_root, chexpert_root, iu_root, padchest_root, tmp_path):
    assert detect_layout(mimic_root) == "mimic-cxr-jpg"
    assert detect_layout(chexpert_root) == "chexpert"
    assert detect_layout(chexpert_root / "CheXpert-v1.0-small") == "chexpert"
    assert detect_layout(iu_root) == "iu-xray"
    assert detect_layout(padchest_root) == "padchest"
    (tmp_path / "other.jsonl").write_text('{"image": "x.png"}\n')
    assert detect_layout(tmp_path / "other.jsonl") == "jsonl"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no known dataset layout"):
        detect_layout(empty)
    with pytest.raises(DatasetError, match="unknown dataset layout 'nih'"):
        load_dataset("nih", empty)
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset("auto", tmp_path / "missing")


def test_patient_split_is_stable_and_80_10_10():
    splits = [patient_split(f"patient{i:05d}") for i in range(3000)]
    assert splits == [patient_split(f"patient{i:05d}") for i in range(3000)]
    fractions = [splits.count(s) / len(splits) for s in ("train", "validate", "test")]
    assert abs(fractions[0] - 0.8) < 0.03
    assert abs(fractions[1] - 0.1) < 0.02 and abs(fractions[2] - 0.1) < 0.02
