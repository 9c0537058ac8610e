"""TensorRT: version/GPU rules and profiles everywhere; the engine build only on a CUDA GPU."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from cxrlite.export.onnx import convert_onnx_fp16, export_vision_onnx, phantom_pixels
from cxrlite.export.tensorrt import build_engine, optimization_profile
from cxrlite.runtime.tensorrt_runner import (
    TensorRTError,
    current_gpu,
    engine_matches,
    parse_version,
    trt_capabilities,
)

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA = torch.cuda.is_available()


def test_volta_needs_tensorrt_10_4_or_older():
    ok = trt_capabilities("10.4.0.26", (7, 0))
    assert ok["supported"] and ok["fp16_mode"] == "flag" and ok["error"] is None
    refused = trt_capabilities("10.5.0", (7, 0))
    assert not refused["supported"]
    assert "Volta" in refused["error"] and '"tensorrt>=10,<10.5"' in refused["error"]
    assert not trt_capabilities("11.1.0", (7, 0))["supported"]
    assert trt_capabilities("10.5.0", (7, 5))["supported"]  # Turing is still in


def test_fp16_is_a_flag_in_10_and_in_the_graph_in_11():
    ten = trt_capabilities("10.13.2", (9, 0))
    assert (ten["fp16_mode"], ten["strongly_typed"]) == ("flag", False)
    eleven = trt_capabilities("11.0.0", (8, 9))
    assert (eleven["fp16_mode"], eleven["strongly_typed"], eleven["supported"]) == (
        "graph", True, True,
    )  # fmt: skip


def test_old_tensorrt_and_old_gpus_are_refused_with_the_fix():
    old = trt_capabilities("8.6.1", (8, 6))
    assert not old["supported"] and "pip install" in old["error"]
    pascal = trt_capabilities("10.0.1", (6, 1))
    assert not pascal["supported"] and "7.0 or newer" in pascal["error"]
    assert parse_version("10.4") == (10, 4, 0)
    with pytest.raises(ValueError, match="not a TensorRT version"):
        parse_version("latest")


def test_optimization_profile_shapes():
    assert optimization_profile(8, 1, 64) == ((1, 1, 64, 64), (4, 1, 64, 64), (8, 1, 64, 64))
    assert optimization_profile(1, 3, 224)[1] == (1, 3, 224, 224)
    assert optimization_profile(8, 3, 384, opt_batch=1)[1][0] == 1
    with pytest.raises(ValueError, match="opt_batch"):
        optimization_profile(4, 1, 64, opt_batch=5)
    with pytest.raises(ValueError, match="max_batch"):
        optimization_profile(0, 1, 64)


def test_engine_matches_only_the_gpu_and_tensorrt_it_was_built_on():
    meta = {"gpu_name": "NVIDIA H100", "compute_capability": [9, 0], "tensorrt_version": "10.9.0"}
    assert engine_matches(meta, dict(meta)) == (True, "same GPU and TensorRT version")
    ok, reason = engine_matches(meta, {**meta, "gpu_name": "NVIDIA H200"})
    assert ok and "H200" in reason
    ok, reason = engine_matches(meta, {**meta, "tensorrt_version": "10.10.0"})
    assert not ok and "10.10.0" in reason
    ok, reason = engine_matches(meta, {**meta, "compute_capability": [8, 6]})
    assert not ok and "rebuild" in reason


@pytest.mark.skipif(HAVE_TRT and HAVE_CUDA, reason="TensorRT and a CUDA GPU are present")
def test_missing_tensorrt_or_gpu_is_a_clear_error():
    with pytest.raises(TensorRTError, match="pip install|CUDA GPU"):
        current_gpu()


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRT and HAVE_CUDA), reason="needs tensorrt and a CUDA GPU")
def test_engine_build_and_run(tiny_checkpoint, tmp_path):
    from cxrlite.runtime.tensorrt_runner import TensorRTVisionRunner

    model, ckpt = tiny_checkpoint("mlp")
    fp32 = export_vision_onnx(ckpt, tmp_path / "vision.onnx")
    fp16 = convert_onnx_fp16(fp32, tmp_path / "vision-fp16.onnx")
    cache = tmp_path / "timing.cache"
    meta = build_engine(fp16, tmp_path / "vision.engine", max_batch=4, timing_cache=cache)
    assert cache.stat().st_size > 0 and meta["profile"]["max"][0] == 4
    assert engine_matches(meta, current_gpu())[0]
    pixels = phantom_pixels(model.cfg, n=3)
    runner = TensorRTVisionRunner(tmp_path / "vision.engine", meta)
    got = np.concatenate([runner(pixels[:1]), runner(pixels[1:])])
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(pixels)).numpy()
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not (HAVE_TRT and HAVE_CUDA), reason="needs tensorrt and a CUDA GPU")
def test_engine_added_to_a_bundle_on_the_serving_machine(tiny_checkpoint, tmp_path):
    from cxrlite.bundle import load_bundle
    from cxrlite.export.bundle import add_tensorrt_engine, export_bundle

    _, ckpt = tiny_checkpoint("qformer")
    export_bundle(ckpt, tmp_path / "bundle")
    bundle = add_tensorrt_engine(tmp_path / "bundle", max_batch=4)
    variant = bundle.vision_variants["tensorrt-fp16"]
    assert variant.parity["passed"] and variant.parity["reference"] == "onnx-fp32"
    assert variant.engine["gpu_name"] == current_gpu()["gpu_name"]
    assert "vision/vision-fp16.engine" in load_bundle(bundle.path).manifest["files"]
