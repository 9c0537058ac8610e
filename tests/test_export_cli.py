"""`cxrlite export` and `cxrlite quantize` end to end on a tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from export_testkit import make_checkpoint

from cxrlite.bundle import load_bundle
from cxrlite.cli import main


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("export-cli")
    _, ckpt = make_checkpoint(root)
    out = root / "bundle"
    code, stdout, stderr = run("export", str(ckpt), "--out", str(out), "--no-fp16", "--gguf", "f32")
    assert code == 0, stdout + stderr
    assert "onnx-fp32" in stdout and "gguf-f32" in stdout and "passed=True" in stdout
    return ckpt, out


def test_export_writes_a_verified_bundle(bundle) -> None:
    _, out = bundle
    b = load_bundle(out)
    assert set(b.vision_variants) == {"onnx-fp32"}
    assert b.llm_variants["gguf-f32"].parity["max_abs_diff_tokens"] <= 1e-3
    assert b.manifest["default"] == {"vision": "onnx-fp32", "llm": "gguf-f32"}


def test_quantize_adds_gguf_and_gptq_variants(bundle, monkeypatch) -> None:
    monkeypatch.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")  # its C++ packer compiles on first use
    _, out = bundle
    args = [
        "--gguf",
        "q8_0",
        "--gptq",
        "--group-size",
        "32",
        "--eval-studies",
        "3",
        "--threads",
        "1",
    ]
    code, stdout, stderr = run("quantize", str(out), *args)
    assert code == 0, stdout + stderr
    b = load_bundle(out)  # every file hashed again: the updates kept the bundle consistent
    assert {"gguf-f32", "gguf-q8_0", "gptq-4bit"} <= set(b.llm_variants)
    assert b.llm_variants["gguf-q8_0"].entry["tensor_types"]
    assert b.llm_variants["gptq-4bit"].entry["format_check"]["format"] == "gptq"  # not gptq_v2
    assert b.file("llm/llm-q8_0.gguf").stat().st_size < b.file("llm/llm-f32.gguf").stat().st_size
    # quality gate: the fp32 reference and every new variant scored on the same held-out phantoms
    quality = b.manifest["quality"]
    assert quality["reference"]["n_studies"] == 3
    for name in ("gguf-q8_0", "gptq-4bit"):
        assert quality[name]["evaluated"] and "findings_f1" in quality[name]["deltas"]
        assert quality[name]["variants"]["llm"] == name
    deployable_gguf = [n for n in ("gguf-q8_0",) if quality[n]["deployable"]]
    assert b.manifest["default"]["llm"] == (deployable_gguf[0] if deployable_gguf else "gguf-f32")


def test_quantize_rejects_unknown_type_and_keeps_bundle(bundle) -> None:
    _, out = bundle
    before = load_bundle(out).manifest["files"]
    code, _, stderr = run("quantize", str(out), "--gguf", "q9_z")
    assert code == 1 and "unknown GGUF quantization type" in stderr and "Traceback" not in stderr
    assert load_bundle(out).manifest["files"] == before


def test_export_refuses_to_replace_user_data(bundle, tmp_path: Path) -> None:
    ckpt, _ = bundle
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "x.txt").write_text("keep me")
    code, _, stderr = run("export", str(ckpt), "--out", str(precious), "--no-fp16")
    assert code == 1 and "not a bundle" in stderr
    assert (precious / "x.txt").read_text() == "keep me"


def test_quantize_on_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    code, _, stderr = run("quantize", str(tmp_path))
    assert code == 1 and "manifest" in stderr


def test_calibration_texts(tmp_path: Path) -> None:
    from cxrlite.quantize.variants import QuantizeError, calibration_texts

    phantom = calibration_texts(None, n=4, seed=1)
    assert len(phantom) == 4 and all(t.strip() for t in phantom)
    assert calibration_texts(None, n=4, seed=1) == phantom  # same seed, same text
    lines = tmp_path / "calibration.txt"
    lines.write_text("Small left effusion.\n\nNo pneumothorax.\n")
    assert calibration_texts(lines) == ["Small left effusion.", "No pneumothorax."]
    jsonl = tmp_path / "calibration.jsonl"
    jsonl.write_text('{"text": "Mild cardiomegaly."}\n{"id": 2}\n')
    assert calibration_texts(jsonl) == ["Mild cardiomegaly."]
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(QuantizeError, match="binary.txt: not UTF-8"):
        calibration_texts(binary)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(QuantizeError, match="no calibration text"):
        calibration_texts(empty)


def test_default_is_the_smallest_deployable_gguf() -> None:
    from cxrlite.bundle import Bundle
    from cxrlite.quantize.gate import best_default, gate_variants

    variants = {
        "gguf-f32": {"file": "llm/f32.gguf", "kind": "gguf"},
        "gguf-q8_0": {"file": "llm/q8.gguf", "kind": "gguf"},
        "gguf-q4_k_m": {"file": "llm/q4.gguf", "kind": "gguf"},
        "gptq-4bit": {"file": "llm/gptq", "kind": "gptq"},
    }
    files = {"llm/f32.gguf": {"size": 400}, "llm/q8.gguf": {"size": 100}}
    files.update({"llm/q4.gguf": {"size": 60}, "llm/gptq/model.safetensors": {"size": 10}})
    manifest = {"files": files, "llm": variants, "default": {"llm": "gguf-f32"}}
    bundle = Bundle(Path("unused"), manifest)
    quality = {
        "gguf-q8_0": {"deployable": True},
        "gguf-q4_k_m": {"deployable": False},
        "gptq-4bit": {"deployable": True},  # smaller, but GGUF runs everywhere
    }
    assert best_default(bundle, quality) == "gguf-q8_0"
    quality["gguf-q4_k_m"]["deployable"] = True
    assert best_default(bundle, quality) == "gguf-q4_k_m"
    assert best_default(bundle, {"gptq-4bit": {"deployable": True}}) == "gguf-f32"
    # no held-out studies: nothing is evaluated, and only --force makes a variant deployable
    skipped = gate_variants(Path("unused"), ["gguf-q8_0"], None, 0, 0.02, False, None)
    assert skipped == {"gguf-q8_0": {"deployable": False, "forced": False, "evaluated": False}}
