"""Vision tower ONNX export: one graph, dynamic batch, fp32/fp16/int8 parity with PyTorch."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from cxrlite.export.onnx import (
    FP16_MAX_REL_ERROR,
    FP32_MAX_ABS_DIFF,
    convert_onnx_fp16,
    export_vision_onnx,
    onnx_precision,
    phantom_pixels,
    quantize_onnx_int8,
    save_onnx,
    split_batches,
    validate_vision_onnx,
)
from cxrlite.model.checkpoint import load
from cxrlite.runtime.onnx_runner import default_providers, onnx_session
from cxrlite.runtime.plan import BackendError


@pytest.fixture(scope="module", params=["mlp", "qformer"])
def exported(request, tiny_checkpoint, tmp_path_factory):
    """(model, checkpoint, fp32 graph) per bridger; the graph is exported from the folder."""
    model, ckpt = tiny_checkpoint(request.param)
    out = tmp_path_factory.mktemp(f"onnx-{request.param}") / "out"
    return model, ckpt, export_vision_onnx(ckpt, out / "vision.onnx")


@pytest.fixture(scope="module")
def batches(exported):
    model, _, _ = exported
    return split_batches(phantom_pixels(model.cfg, n=3))  # sizes 1 and 2


def test_fp32_graph_matches_pytorch_at_batch_1_and_2(exported, batches):
    model, ckpt, path = exported
    assert [len(b) for b in batches] == [1, 2]
    session = onnx_session(path, ["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, out.name, out.type) == (
        "pixels", "tensor(float)", "image_embeds", "tensor(float)",
    )  # fmt: skip
    embeds = session.run(None, {"pixels": batches[1]})[0]
    assert embeds.shape == (2, model.cfg.n_image_tokens, model.cfg.llm.hidden_size)

    # Compared with the full model as loaded for training/serving, not the export's own tower.
    full, _, _ = load(ckpt)
    report = validate_vision_onnx(path, full, batches, providers=["CPUExecutionProvider"])
    assert report["precision"] == "float32"
    assert report["batch_sizes"] == [1, 2] and report["n_images"] == 3
    assert report["max_abs_diff"] <= FP32_MAX_ABS_DIFF and report["passed"] is True
    assert report["mean_cosine"] > 0.999999


def test_graph_is_labelled_and_carries_no_stack_traces(exported):
    model, _, path = exported
    graph = onnx.load(str(path))
    props = {p.key: p.value for p in graph.metadata_props}
    assert props["cxrlite.n_image_tokens"] == str(model.cfg.n_image_tokens)
    assert props["cxrlite.precision"] == "float32"
    assert not any(len(node.metadata_props) for node in graph.graph.node)
    assert [p.name for p in path.parent.iterdir()] == ["vision.onnx"]  # no temp leftovers


def test_fp16_graph_keeps_float32_io_and_matches(exported, batches, tmp_path):
    model, _, path = exported
    fp16 = convert_onnx_fp16(path, tmp_path / "vision-fp16.onnx")
    assert onnx_precision(fp16) == "float16"
    graph = onnx.load(str(fp16))
    io_types = {v.type.tensor_type.elem_type for v in [*graph.graph.input, *graph.graph.output]}
    assert io_types == {onnx.TensorProto.FLOAT}
    # Weights are stored in fp16: half the bytes of the fp32 graph's weights.
    assert weight_bytes(graph) == pytest.approx(weight_bytes(onnx.load(str(path))) / 2, rel=0.02)
    report = validate_vision_onnx(fp16, model, batches)
    assert report["max_rel_error"] <= FP16_MAX_REL_ERROR and report["passed"] is True
    # ...yet it is really fp16: not within fp32's threshold.
    assert report["max_abs_diff"] > FP32_MAX_ABS_DIFF


def weight_bytes(graph) -> int:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return sum(len(t.raw_data) for t in graph.graph.initializer if t.data_type in floats)


def test_int8_graph_reports_cosine_similarity(exported, batches, tmp_path):
    model, _, path = exported
    int8 = quantize_onnx_int8(path, tmp_path / "vision-int8.onnx")
    assert onnx_precision(int8) == "int8"
    report = validate_vision_onnx(int8, model, batches)
    assert report["passed"] is None and report["threshold"] is None
    assert report["mean_cosine"] > 0.99
    assert report["max_abs_diff"] > FP32_MAX_ABS_DIFF


def test_parity_check_detects_a_different_model(exported, batches):
    model, _, path = exported
    other = copy.deepcopy(model)
    with torch.no_grad():
        list(other.bridger.parameters())[-1].add_(0.1)  # the output projection's bias
    report = validate_vision_onnx(path, other, batches)
    assert report["passed"] is False and report["max_abs_diff"] > 1e-3


def test_default_providers_prefer_cuda_and_tensorrt_only_on_request():
    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(every) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert default_providers(every, tensorrt=True) == every
    assert default_providers(["CPUExecutionProvider"], tensorrt=True) == ["CPUExecutionProvider"]


def test_bad_inputs_raise_typed_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="bad.onnx"):
        onnx_session(bad, ["CPUExecutionProvider"])
    with pytest.raises(TypeError, match="checkpoint folder, CXRVLM or VisionTower"):
        export_vision_onnx(object(), tmp_path / "out" / "v.onnx")
    assert not (tmp_path / "out" / "v.onnx").exists()
    assert np.asarray(split_batches(np.zeros((1, 1, 4, 4)))[0]).shape == (1, 1, 4, 4)


def test_weights_can_live_beside_the_graph(exported, batches, tmp_path):
    # What a >2 GB tower gets: the graph names a weights file, both written atomically.
    model, _, path = exported
    out = save_onnx(onnx.load(str(path)), tmp_path / "v.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.onnx", "v.onnx.data"]
    assert (tmp_path / "v.onnx.data").stat().st_size > out.stat().st_size
    assert validate_vision_onnx(out, model, batches)["passed"] is True
    fp16 = convert_onnx_fp16(out, tmp_path / "half" / "v16.onnx")
    assert validate_vision_onnx(fp16, model, batches)["passed"] is True


def test_dinov2_tower_with_normed_features_and_deep_projector_exports(tmp_path):
    """The MAIRA-2 layout's parts (DINOv2, final norm on the features, a 4-layer projector) in
    one graph, at batch 1 and 2, fp32 and fp16."""
    from export_testkit import make_checkpoint

    model, ckpt = make_checkpoint(
        tmp_path, vision={"kind": "dinov2", "feature_norm": True, "num_channels": 3},
        bridger={"kind": "mlp", "mlp_layers": 4},
        preprocess={"image_size": 64, "channels": 3, "mean": 0.5, "std": 0.5},
    )  # fmt: skip
    batches = split_batches(phantom_pixels(model.cfg, n=3))
    fp32 = export_vision_onnx(ckpt, tmp_path / "vision.onnx")
    report = validate_vision_onnx(fp32, model, batches)
    assert report["passed"] and report["max_abs_diff"] <= FP32_MAX_ABS_DIFF
    fp16 = convert_onnx_fp16(fp32, tmp_path / "vision-fp16.onnx")
    assert validate_vision_onnx(fp16, model, batches)["passed"]
