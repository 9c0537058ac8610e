"""The `cxrlite` CLI: data commands and doctor, end to end on small phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cxrlite.cli import main
from cxrlite.data.labels import CHEXPERT_OBSERVATIONS
from cxrlite.fileio import read_jsonl


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    code, stdout, _ = run(
        "data", "phantoms", "--n", "12", "--out", str(out), "--size", "128", "--seed", "3"
    )
    assert code == 0, stdout
    assert "wrote 12 phantoms" in stdout
    return out


def test_help_lists_only_real_commands() -> None:
    code, stdout, _ = run("--help")
    assert code == 0
    assert "data" in stdout and "doctor" in stdout


def test_phantoms_manifest(phantom_dir: Path) -> None:
    rows = read_jsonl(phantom_dir / "manifest.jsonl")
    assert len(rows) == 12
    assert all((phantom_dir / r["image"]).is_file() for r in rows)
    assert all(set(r["chexpert"]) == set(CHEXPERT_OBSERVATIONS) for r in rows)


def test_show_writes_sheet(phantom_dir: Path, tmp_path: Path) -> None:
    code, _, _ = run(
        "data", "show", str(phantom_dir), "--out", str(tmp_path / "sheet.png"), "--n", "6"
    )
    assert code == 0
    with Image.open(tmp_path / "sheet.png") as im:
        assert im.size[0] > 256 and im.size[1] > 128


def test_dicom_then_inspect_with_png(phantom_dir: Path, tmp_path: Path) -> None:
    png = phantom_dir / read_jsonl(phantom_dir / "manifest.jsonl")[0]["image"]
    dcm = tmp_path / "study.dcm"
    code, _, _ = run("data", "dicom", str(png), "--out", str(dcm), "--monochrome1")
    assert code == 0
    seen = tmp_path / "seen.png"
    code, stdout, _ = run(
        "data", "inspect", str(dcm), "--png", str(seen), "--image-size", "64", "--json"
    )
    assert code == 0
    row = json.loads(stdout)
    assert row["ok"] and row["format"] == "dicom"
    assert row["photometric_interpretation"] == "MONOCHROME1" and row["bits_stored"] == 12
    assert "ANON" not in stdout and "PatientName" not in stdout  # no identifiers printed
    # MONOCHROME1 was inverted back: the model input matches the original PNG's orientation.
    with Image.open(seen) as a, Image.open(png) as b:
        assert a.size == (64, 64)
        ref = np.asarray(b.convert("L").resize((64, 64)), dtype=np.float32)
        got = np.asarray(a.convert("L"), dtype=np.float32)
        assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.95


def test_inspect_reports_bad_files_and_exits_nonzero(phantom_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "notes.dcm"
    bad.write_text("this is not an image")
    good = phantom_dir / read_jsonl(phantom_dir / "manifest.jsonl")[0]["image"]
    code, stdout, stderr = run(
        "data", "inspect", str(good), str(bad), str(tmp_path / "missing.png")
    )
    assert code == 1
    assert f"{good}: format=png" in stdout
    assert "not_an_image" in stderr and "notes.dcm" in stderr
    assert "missing.png" in stderr
    assert "Traceback" not in stdout + stderr


def test_label_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "reports.txt"
    txt.write_text("Moderate right pleural effusion. No pneumothorax.\n\nHeart size is normal.\n")
    out = tmp_path / "labels.jsonl"
    code, _, _ = run("data", "label", str(txt), "--out", str(out))
    assert code == 0
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == [1, 3]
    assert rows[0]["labels"]["Pleural Effusion"] == "positive"
    assert rows[0]["labels"]["Pneumothorax"] == "negative"
    assert rows[1]["labels"]["Cardiomegaly"] == "negative"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    code, _, stderr = run("data", "label", str(bad), "--out", str(out))
    assert code == 1 and "record 1" in stderr and "Traceback" not in stderr


def test_tasks_from_phantoms(phantom_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tasks.jsonl"
    code, stdout, _ = run("data", "tasks", str(phantom_dir), "--out", str(out))
    assert code == 0
    rows = read_jsonl(out)
    tasks = {r["task"] for r in rows}
    assert {"findings_generation", "view_classification", "image_text_reasoning"} <= tasks
    assert f"{len(rows)} task records" in stdout


def test_import_detects_phantom_layout(phantom_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "studies.jsonl"
    code, stdout, _ = run("data", "import", str(phantom_dir), "--out", str(out))
    assert code == 0 and stdout.startswith("phantom: 12 studies")


def test_doctor_json() -> None:
    code, stdout, _ = run("doctor", "--json")
    assert code == 0
    checks = {c["name"]: c for c in json.loads(stdout)["checks"]}
    assert checks["torch"]["ok"] and checks["pydicom"]["ok"]
