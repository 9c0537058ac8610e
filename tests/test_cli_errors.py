"""Every `cxrlite` command answers a user's mistake (a missing file, a file that is not an image,
a folder that is not a bundle or checkpoint, a bad option value) with a non-zero exit and one
line that names the file or option: no traceback. Cheap inputs only: nothing trains or builds a
model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from cxrlite.cli import main
from cxrlite.phantoms.generator import generate_phantoms


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-errors")
    empty = root / "empty"
    empty.mkdir()
    not_image = root / "notes.png"
    not_image.write_text("this is not an image")
    binary = root / "reports.txt"
    binary.write_bytes(bytes(range(128, 256)) * 4)  # not UTF-8
    broken = root / "broken-ckpt"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    phantoms = root / "phantoms"
    generate_phantoms(phantoms, 4, seed=0, size=64)
    return {
        "empty": empty,
        "not_image": not_image,
        "binary": binary,
        "broken": broken,
        "phantoms": phantoms,
        "missing": root / "missing.png",
        "out": root / "out",
    }


def fails_cleanly(args: list[str], *names: str) -> str:
    """Run `cxrlite ARGS`; assert a non-zero exit that names each of `names`, no traceback, and
    no exception escaping the CLI (CliRunner would hide its traceback)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    output = result.output
    assert result.exit_code != 0, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert "Traceback" not in output, output
    for name in names:
        assert str(name) in output, (name, output)
    return output


# --- data ----------------------------------------------------------------------------------------


def test_data_phantoms_bad_count(files):
    fails_cleanly(["data", "phantoms", "--n", "0", "--out", files["out"]], "--n")


def test_data_show_folder_without_phantoms(files):
    fails_cleanly(["data", "show", files["empty"], "--out", files["out"] / "s.png"], files["empty"])


def test_data_inspect_file_that_is_not_an_image(files):
    out = fails_cleanly(["data", "inspect", files["not_image"]], files["not_image"])
    assert "not_an_image" in out


def test_data_inspect_missing_file(files):
    fails_cleanly(["data", "inspect", files["missing"]], files["missing"])


def test_data_label_missing_and_binary_files(files):
    out = files["out"] / "labels.jsonl"
    fails_cleanly(["data", "label", files["missing"], "--out", out], files["missing"])
    text = fails_cleanly(["data", "label", files["binary"], "--out", out], files["binary"])
    assert "UTF-8" in text


def test_data_import_folder_without_a_layout_and_unknown_layout(files):
    out = files["out"] / "studies.jsonl"
    fails_cleanly(["data", "import", files["empty"], "--out", out], files["empty"])
    fails_cleanly(["data", "import", files["empty"], "--layout", "nope", "--out", out], "'nope'")


def test_data_tasks_folder_without_a_layout(files):
    out = files["out"] / "tasks.jsonl"
    fails_cleanly(["data", "tasks", files["empty"], "--out", out], files["empty"])


def test_data_dicom_from_a_file_that_is_not_an_image(files):
    out = files["out"] / "x.dcm"
    fails_cleanly(["data", "dicom", files["not_image"], "--out", out], files["not_image"])


# --- train, export, quantize, eval ---------------------------------------------------------------


def test_train_bad_inputs(files):
    out = files["out"] / "run"
    fails_cleanly(["train", "--data", files["empty"], "--out", out], files["empty"])
    fails_cleanly(["train", "--data", files["missing"], "--out", out], "--data")
    fails_cleanly(["train", "--data", files["phantoms"], "--out", out, "--stages", "x"], "--stages")
    fails_cleanly(
        ["train", "--data", files["phantoms"], "--out", out, "--preset", "nope"], "'nope'"
    )
    fails_cleanly(["train", "--data", files["phantoms"], "--out", out, "--stages", "9"], "[9]")


def test_export_from_a_folder_that_is_not_a_checkpoint(files):
    out = files["out"] / "bundle"
    fails_cleanly(["export", files["empty"], "--out", out], files["empty"])
    fails_cleanly(["export", files["broken"], "--out", out], files["broken"] / "config.json")
    fails_cleanly(["export", files["empty"], "--out", out, "--gguf", "q4"], "--gguf")
    assert not out.exists()


def test_quantize_a_folder_that_is_not_a_bundle(files):
    fails_cleanly(["quantize", files["empty"]], files["empty"])
    fails_cleanly(["quantize", files["empty"], "--bits", "5"], "--bits")
    fails_cleanly(["quantize", files["missing"]], files["missing"])


def test_eval_a_folder_that_is_neither_checkpoint_nor_bundle(files):
    data = ["--data", files["phantoms"]]
    fails_cleanly(["eval", files["empty"], *data], files["empty"])
    fails_cleanly(["eval", files["broken"], *data], files["broken"] / "config.json")
    fails_cleanly(["eval", files["empty"], "--data", files["missing"]], "--data")
    fails_cleanly(["eval", files["empty"], *data, "--max-tokens", "0"], "--max-tokens")


# --- report, serve, bench, doctor ----------------------------------------------------------------


def test_report_with_a_folder_that_is_not_a_bundle(files):
    args = ["report", files["not_image"], "--bundle", files["empty"]]
    fails_cleanly(args, files["empty"])
    fails_cleanly(["report", files["missing"], "--bundle", files["empty"]], files["missing"])


def test_serve_bad_port(files):
    fails_cleanly(["serve", files["empty"], "--port", "70000"], "--port")


def test_serve_a_folder_that_is_not_a_bundle(files):
    # A subprocess with a time limit: a server that kept running would otherwise hang the test.
    command = [sys.executable, "-m", "cxrlite.cli", "serve", str(files["empty"]), "--port", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert str(files["empty"]) in output and "Traceback" not in output, output


def test_bench_a_folder_that_is_not_a_bundle(files):
    fails_cleanly(["bench", files["empty"], "--runs", "1"], files["empty"])
    fails_cleanly(["bench", "--shape", "3b"], "--shape")


def test_doctor_unknown_option():
    fails_cleanly(["doctor", "--bogus"], "--bogus")
