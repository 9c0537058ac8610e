"""The deployment bundle: export, load with verification, tampering, interrupted writes, updates."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from cxrlite.bundle import MANIFEST_FILE, BundleError, load_bundle, sha256_file
from cxrlite.export.bundle import add_tensorrt_engine, create_bundle, export_bundle, update_bundle
from cxrlite.export.onnx import quantize_onnx_int8
from cxrlite.model.config import ModelConfig
from cxrlite.model.tokenizer import load_tokenizer
from cxrlite.runtime.onnx_runner import onnx_session
from cxrlite.runtime.tensorrt_runner import TensorRTError


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    model, ckpt = tiny_checkpoint("mlp")
    bundle = export_bundle(ckpt, tmp_path_factory.mktemp("bundle") / "bundle", fp16=True, int8=True)
    return model, ckpt, bundle


@pytest.fixture
def bundle_copy(exported, tmp_path):
    _, _, bundle = exported
    return shutil.copytree(bundle.path, tmp_path / "bundle")


def test_export_writes_a_complete_verified_bundle(exported):
    model, ckpt, bundle = exported
    again = load_bundle(bundle.path)  # verifies every size and sha256
    m = again.manifest
    assert (m["format"], m["format_version"]) == ("cxrlite-bundle", 1)
    assert again.config == model.cfg and again.preprocess.image_size == 64
    assert m["source"]["weights_sha256"] == sha256_file(ckpt / "model.safetensors")
    assert m["prompt"]["template"] == "cxr-chat-v1" and "ASSISTANT:" in m["prompt"]["chat_template"]
    assert load_tokenizer(again.tokenizer_dir).chat_template == m["prompt"]["chat_template"]

    # Every file but the manifest is listed, with its real size and hash.
    on_disk = {p.relative_to(bundle.path).as_posix() for p in bundle.path.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {MANIFEST_FILE}
    assert {"tokenizer/tokenizer.json", "vision/vision-fp32.onnx"} <= set(m["files"])

    assert set(again.vision_variants) == {"onnx-fp32", "onnx-fp16", "onnx-int8"}
    assert again.default == {"vision": "onnx-fp32", "llm": None}
    parity = {name: v.parity for name, v in again.vision_variants.items()}
    assert parity["onnx-fp32"]["max_abs_diff"] <= 1e-4 and parity["onnx-fp32"]["passed"]
    assert parity["onnx-fp16"]["max_rel_error"] <= 1e-2 and parity["onnx-fp16"]["passed"]
    assert parity["onnx-int8"]["mean_cosine"] > 0.99 and parity["onnx-int8"]["passed"] is None
    assert parity["onnx-fp32"]["batch_sizes"] == [1, 3]  # 4 held-out phantoms
    session = onnx_session(again.variant_file("vision", "onnx-fp16"), ["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "pixels"
    assert not list(bundle.path.parent.glob(".tmp-*"))  # the staging folder is gone


def test_a_modified_byte_is_refused_naming_the_file(bundle_copy):
    target = bundle_copy / "vision" / "vision-fp32.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="vision/vision-fp32.onnx does not match its sha256"):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, verify="size")  # same size: only sha256 sees it
    target.write_bytes(bytes(data[:-1]))
    with pytest.raises(BundleError, match="vision-fp32.onnx is .* bytes, the manifest says"):
        load_bundle(bundle_copy, verify="size")


def test_a_missing_file_is_refused(bundle_copy):
    (bundle_copy / "tokenizer" / "tokenizer.model").unlink()
    with pytest.raises(BundleError, match="tokenizer/tokenizer.model is missing"):
        load_bundle(bundle_copy)


def edit_manifest(folder, change):
    path = folder / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=999), "format_version 999 is newer"),
        (lambda m: m.update(format="something-else"), "unknown format 'something-else'"),
        (lambda m: m["model"]["vision"].update(num_heads=5), "config does not validate"),
        (lambda m: m["files"].update({"../etc/passwd": m["files"]["vision/vision-fp32.onnx"]}),
         "unsafe path"),
        (lambda m: m["default"].update(vision="tensorrt-fp16"), "does not exist"),
        (lambda m: m["vision"]["onnx-fp32"].update(file="vision/x.onnx"), "unlisted"),
    ],
)  # fmt: skip
def test_bad_manifests_are_refused(bundle_copy, change, message):
    edit_manifest(bundle_copy, change)
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy, verify=False)


def test_no_manifest_is_refused_as_partial(bundle_copy, tmp_path):
    (bundle_copy / MANIFEST_FILE).unlink()
    with pytest.raises(BundleError, match="partial"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")


def test_a_builder_that_fails_leaves_nothing(exported, tmp_path):
    _, ckpt, _ = exported

    def half_then_crash(staging):
        (staging / "vision").mkdir()
        (staging / "vision" / "vision-fp32.onnx").write_bytes(b"half a graph")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        create_bundle(ckpt, tmp_path / "out", half_then_crash)
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging folder

    # A staging folder left by a killed process is never taken for a bundle.
    killed = tmp_path / ".tmp-out-abc"
    shutil.copytree(exported[2].path, killed)
    with pytest.raises(BundleError, match="interrupted export"):
        load_bundle(killed)


def test_extra_builders_add_their_variants(exported, tmp_path):
    _, ckpt, _ = exported

    def torch_llm(staging):  # what the lead's GGUF builder does, with the torch weights
        (staging / "llm").mkdir()
        shutil.copyfile(ckpt / "model.safetensors", staging / "llm" / "model.safetensors")
        return {"llm": {"torch-fp32": {"file": "llm/model.safetensors", "kind": "torch"}}}

    bundle = create_bundle(ckpt, tmp_path / "b", [torch_llm])
    assert bundle.default == {"vision": None, "llm": "torch-fp32"}
    assert load_bundle(bundle.path).manifest["files"]["llm/model.safetensors"]["sha256"] == (
        sha256_file(ckpt / "model.safetensors")
    )
    with pytest.raises(BundleError, match="unknown manifest sections \\['visoin'\\]"):
        create_bundle(ckpt, tmp_path / "c", lambda staging: {"visoin": {}})
    assert not (tmp_path / "c").exists()


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
    reason="TensorRT and a CUDA GPU are present",
)
def test_tensorrt_requests_fail_early_without_tensorrt_or_gpu(exported, bundle_copy, tmp_path):
    _, ckpt, _ = exported
    with pytest.raises(TensorRTError, match="pip install|CUDA GPU"):
        export_bundle(ckpt, tmp_path / "trt", tensorrt=True)
    assert not (tmp_path / "trt").exists()
    with pytest.raises(TensorRTError, match="pip install|CUDA GPU"):
        add_tensorrt_engine(bundle_copy)


def test_existing_folders_are_not_replaced_unless_asked(exported, bundle_copy, tmp_path):
    _, ckpt, _ = exported
    with pytest.raises(BundleError, match="already exists"):
        create_bundle(ckpt, bundle_copy)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="not a bundle"):
        create_bundle(ckpt, precious, overwrite=True)
    replaced = create_bundle(ckpt, bundle_copy, overwrite=True)  # base parts only
    assert load_bundle(bundle_copy).vision_variants == {} and replaced.default["vision"] is None


def test_update_adds_a_variant_and_cleans_leftovers(bundle_copy):
    (bundle_copy / "stray.bin").write_bytes(b"left by a crashed update")
    before = load_bundle(bundle_copy).manifest

    def add_q(staging):
        fp32 = bundle_copy / "vision" / "vision-fp32.onnx"
        quantize_onnx_int8(fp32, staging / "vision" / "vision-int8-q.onnx")
        entry = {"file": "vision/vision-int8-q.onnx", "kind": "onnx", "dtype": "int8"}
        return {"vision": {"onnx-int8-q": entry, "onnx-int8": None}, "quality": {"x": {"f1": 1}}}

    bundle = update_bundle(bundle_copy, add_q)
    after = load_bundle(bundle_copy).manifest
    assert set(bundle.vision_variants) == {"onnx-fp32", "onnx-fp16", "onnx-int8-q"}
    assert after == bundle.manifest and after["quality"] == {"x": {"f1": 1}}
    assert "vision/vision-int8-q.onnx" in after["files"]
    assert "vision/vision-int8.onnx" not in after["files"]  # its variant was removed
    assert not (bundle_copy / "vision" / "vision-int8.onnx").exists()
    assert not (bundle_copy / "stray.bin").exists()
    assert after["created"] == before["created"] and "updated" in after


def test_an_update_that_fails_keeps_the_previous_bundle(bundle_copy):
    before = (bundle_copy / MANIFEST_FILE).read_bytes()

    def crash(staging):
        (staging / "vision").mkdir()
        (staging / "vision" / "vision-fp32.onnx").write_bytes(b"a new graph, half written")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        update_bundle(bundle_copy, crash)
    assert (bundle_copy / MANIFEST_FILE).read_bytes() == before
    load_bundle(bundle_copy)  # every listed file still verifies
    assert not list(bundle_copy.glob(".tmp-*"))


def test_an_update_replacing_a_listed_file_drops_then_readds_its_variant(bundle_copy):
    fp16_bytes = (bundle_copy / "vision" / "vision-fp16.onnx").read_bytes()

    def replace_int8(staging):
        (staging / "vision").mkdir()
        (staging / "vision" / "vision-int8.onnx").write_bytes(fp16_bytes)  # other content
        entry = {"file": "vision/vision-int8.onnx", "kind": "onnx", "dtype": "float16"}
        return {"vision": {"onnx-int8": entry}}

    bundle = update_bundle(bundle_copy, replace_int8)
    assert bundle.vision_variants["onnx-int8"].dtype == "float16"
    assert load_bundle(bundle_copy).manifest["files"]["vision/vision-int8.onnx"]["sha256"] == (
        sha256_file(bundle_copy / "vision" / "vision-fp16.onnx")
    )


def test_config_round_trips(exported):
    _, _, bundle = exported
    assert ModelConfig.from_dict(bundle.manifest["model"]).to_dict() == bundle.manifest["model"]
    with pytest.raises(BundleError, match="not listed"):
        bundle.file("model.safetensors")


def test_a_crash_while_replacing_files_leaves_a_verifying_bundle(bundle_copy, monkeypatch):
    import cxrlite.export.bundle as bundle_module

    def replace_int8(staging):
        (staging / "vision").mkdir()
        (staging / "vision" / "vision-int8.onnx").write_bytes(b"new content")
        return {"vision": {"onnx-int8": {"file": "vision/vision-int8.onnx", "kind": "onnx"}}}

    real_replace = bundle_module.os.replace

    def killed(src, dst):  # manifest writes go through; the first file move dies
        if Path(dst).name == MANIFEST_FILE:
            return real_replace(src, dst)
        raise OSError("killed while moving files in")

    monkeypatch.setattr(bundle_module.os, "replace", killed)
    with pytest.raises(OSError, match="killed"):
        update_bundle(bundle_copy, replace_int8)
    monkeypatch.undo()
    # The old int8 file was about to be overwritten: no manifest lists it any more.
    survivor = load_bundle(bundle_copy)
    assert set(survivor.vision_variants) == {"onnx-fp32", "onnx-fp16"}
    assert "vision/vision-int8.onnx" not in survivor.manifest["files"]
