"""`cxrlite report`: a folder with a bad file in it, JSON and text output, the JSONL file."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from runtime_testkit import runtime_bundle

from cxrlite.commands.report import expand_inputs, report
from cxrlite.data.labels import CHEXPERT_OBSERVATIONS
from cxrlite.fileio import read_jsonl
from cxrlite.imaging.write import png_bytes
from cxrlite.phantoms.generator import make_phantom_study


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return runtime_bundle(tmp_path_factory)[2]


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "studies"
    (root / "sub").mkdir(parents=True)
    for i, rel in enumerate(["a.png", "sub/b"]):  # b has no suffix: found by its content
        _, image = make_phantom_study(3, i, size=64)
        (root / rel).write_bytes(png_bytes(image))
    data = png_bytes(make_phantom_study(3, 2, size=64)[1])
    (root / "cut.png").write_bytes(data[: len(data) // 2])  # a truncated PNG
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(data)
    return root


def test_folder_expands_to_images_by_content_and_name(folder):
    files, skipped = expand_inputs((folder,))
    assert [f.relative_to(folder).as_posix() for f in files] == ["a.png", "cut.png", "sub/b"]
    assert skipped == 1  # notes.txt


def test_report_folder_with_a_bad_file(bundle, folder, tmp_path):
    out = tmp_path / "results.jsonl"
    args = [
        str(folder),
        "--bundle",
        str(bundle),
        "--json",
        "--out",
        str(out),
        "--max-tokens",
        "12",
        "--threads",
        "1",
    ]
    result = CliRunner().invoke(report, args)
    assert result.exit_code == 1, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["file"] for row in lines] == [str(folder / "a.png"), str(folder / "sub" / "b")]
    for row in lines:
        assert list(row["labels"]) == list(CHEXPERT_OBSERVATIONS)
        assert row["variants"] == {"vision": "onnx-fp32", "llm": "gguf-f32"}
        assert row["timings"]["findings"]["prefill_ms"] > 0
        assert isinstance(row["findings"], str) and isinstance(row["impression"], str)
    assert f"error: {folder / 'cut.png'}: [" in result.stderr
    assert "1 of 3 image(s) failed" in result.stderr and "passed over 1 non-image" in result.stderr
    assert read_jsonl(out) == lines


def test_report_text_output_for_one_file(bundle, folder):
    args = [str(folder / "a.png"), "--bundle", str(bundle), "--max-tokens", "8", "--threads", "1"]
    result = CliRunner().invoke(report, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{folder / 'a.png'}\n  FINDINGS: ")
    assert "\n  IMPRESSION: " in result.stdout and "\n  labels: " in result.stdout
    assert result.stderr == ""
