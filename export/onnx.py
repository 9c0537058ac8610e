"""The vision tower (encoder + feature selection + bridger) as one ONNX graph, and its parity check.

`export_vision_onnx` writes `pixels` float32 [B, C, H, W] -> `image_embeds` float32
[B, n_image_tokens, n_embd] with a dynamic batch, exactly `CXRVLM.encode_image`. Variants:
- fp32: torch.onnx.export(dynamo=True) of the tower.
- fp16: the fp32 graph converted by onnxruntime's float16 converter with float32 inputs/outputs
  kept (casts at the boundary), so callers never change and TensorRT 11 (strong typing only) gets
  fp16 from the graph itself.
- int8: onnxruntime dynamic quantization of the fp32 graph (int8 weights; for CPUs).
`validate_vision_onnx` runs a graph in onnxruntime (all graph optimizations on) and compares it
with PyTorch. Relative error is defined as max|onnx - torch| / max|torch| over all embeddings:
a scale-free figure for fp16, whose error grows with the embeddings' magnitude.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrlite.bundle import VISION_INPUT, VISION_OUTPUT
from cxrlite.errors import CxrliteError
from cxrlite.model.checkpoint import load_vision_tower
from cxrlite.model.config import ModelConfig
from cxrlite.model.vlm import VisionTower
from cxrlite.runtime.onnx_runner import onnx_session

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter warns about torchvision ops it skips (we install no torchvision) and
    about its own deprecations; none concerns our graph, and they would bury the CLI output."""
    import warnings

    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        onnx_logger.setLevel(level)


DEFAULT_OPSET = 18  # LayerNormalization is a single op from 17; TensorRT maps it to INormalization
FP32_MAX_ABS_DIFF = 1e-4
FP16_MAX_REL_ERROR = 1e-2
# protobuf cannot serialize a message over 2 GiB; bigger graphs keep their weights beside them.
_EXTERNAL_DATA_BYTES = 1_800_000_000
# Blocked from fp16: LayerNormalization's variance of large ViT activations (SigLIP residuals reach
# hundreds) overflows fp16, and NVIDIA advises fp32 normalization; it costs two casts per norm.
_FP32_OPS = ("LayerNormalization",)


class ExportError(CxrliteError, RuntimeError):
    """An export could not be written or does not reproduce the PyTorch model."""


class ParityError(ExportError):
    """An exported graph differs from PyTorch beyond its precision's threshold."""


def _as_tower(source: Any) -> tuple[nn.Module, ModelConfig]:
    """(module whose forward is encode_image on fp32 CPU weights, config) for a checkpoint folder,
    a CXRVLM or a VisionTower."""
    if isinstance(source, str | os.PathLike):
        tower = load_vision_tower(source)
        return tower, tower.cfg
    if not hasattr(source, "encode_image") or not hasattr(source, "cfg"):
        raise TypeError(f"expected a checkpoint folder, CXRVLM or VisionTower, got {type(source)}")
    tower = VisionTower.__new__(VisionTower)
    nn.Module.__init__(tower)
    tower.cfg = source.cfg
    tower.vision, tower.bridger = source.vision, source.bridger
    param = next(tower.parameters())
    if param.dtype != torch.float32 or param.device.type != "cpu":
        # Export traces fp32 CPU weights; copy only the tower, never the caller's model.
        import copy

        tower = copy.deepcopy(tower).to(device="cpu", dtype=torch.float32)
    return tower.eval(), source.cfg


@contextlib.contextmanager
def _staging(out_path: Path) -> Any:
    """A temp folder beside `out_path`, removed afterwards whatever happens."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_path.name}.", dir=out_path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_onnx(model: Any, out_path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write an onnx ModelProto atomically: a temp folder beside `out_path`, then renames (the
    weights file `<name>.data` first, the graph that names it last). `external_data` None keeps
    weights outside only when the graph is too big for one protobuf. Returns `out_path`."""
    import onnx

    out = Path(out_path)
    big = model.ByteSize() > _EXTERNAL_DATA_BYTES if external_data is None else external_data
    data_name = out.name + ".data"
    with _staging(out) as tmp:
        onnx.save_model(model, str(tmp / out.name), save_as_external_data=big, location=data_name)
        if big:
            os.replace(tmp / data_name, out.parent / data_name)
        os.replace(tmp / out.name, out)
    return out


def _strip_and_label(model: Any, cfg: ModelConfig, precision: str) -> Any:
    """Drop per-node export metadata (stack traces naming this machine's paths; several MB on big
    towers) and record what the graph computes in the model's metadata."""
    import onnx

    import cxrlite

    for node in model.graph.node:
        del node.metadata_props[:]
    labels = {
        "cxrlite.version": cxrlite.__version__,
        "cxrlite.precision": precision,
        "cxrlite.n_image_tokens": str(cfg.n_image_tokens),
        "cxrlite.n_embd": str(cfg.llm.hidden_size),
        "cxrlite.image_size": str(cfg.vision.image_size),
        "cxrlite.channels": str(cfg.vision.num_channels),
    }
    kept = [p for p in model.metadata_props if p.key not in labels]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in kept}, **labels})
    return model


def _export_proto(source: Any, opset: int) -> tuple[Any, ModelConfig]:
    tower, cfg = _as_tower(source)
    example = torch.zeros(2, cfg.vision.num_channels, cfg.vision.image_size, cfg.vision.image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                tower,
                (example,),
                dynamo=True,
                input_names=[VISION_INPUT],
                output_names=[VISION_OUTPUT],
                dynamic_shapes={"pixels": {0: batch}},
                opset_version=opset,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; all mean "this graph cannot export"
        raise ExportError(f"torch.onnx.export of the vision tower failed: {e}") from e
    return _strip_and_label(program.model_proto, cfg, "float32"), cfg


def to_fp16(model: Any) -> Any:
    """An fp32 ModelProto with weights and compute in fp16 and float32 inputs/outputs."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    converted = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *_FP32_OPS]
    )
    for prop in converted.metadata_props:
        if prop.key == "cxrlite.precision":
            prop.value = "float16"
    return converted


def export_vision_onnx(
    source: str | os.PathLike | nn.Module,
    out_path: str | os.PathLike,
    *,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export a checkpoint folder's (or a CXRVLM's) vision tower to one ONNX file; see the
    module docstring. The file appears only once complete."""
    model, cfg = _export_proto(source, opset)
    if fp16:
        model = to_fp16(model)
    out = save_onnx(model, out_path)
    logger.info(
        "exported the %s vision tower (%s) to %s", cfg.bridger.kind, "fp16" if fp16 else "fp32", out
    )
    return out


def convert_onnx_fp16(src_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """The fp16 variant of an fp32 vision graph (float32 inputs/outputs)."""
    import onnx

    return save_onnx(to_fp16(onnx.load(str(src_path))), out_path)


def quantize_onnx_int8(src_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Dynamic int8 quantization (int8 weights, activations quantized per call) for CPUs, after
    onnxruntime's recommended pre-processing (shape inference and graph optimization)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out = Path(out_path)
    big = (
        Path(src_path).stat().st_size > _EXTERNAL_DATA_BYTES
        or Path(str(src_path) + ".data").exists()
    )
    with _staging(out) as tmp:
        quant_pre_process(Path(src_path), tmp / "pre.onnx", save_as_external_data=big)
        quantize_dynamic(
            tmp / "pre.onnx",
            tmp / "int8.onnx",
            weight_type=QuantType.QInt8,
            per_channel=True,
            use_external_data_format=big,
        )
        model = onnx.load(str(tmp / "int8.onnx"))
    for prop in model.metadata_props:
        if prop.key == "cxrlite.precision":
            prop.value = "int8"
    return save_onnx(model, out)


def onnx_precision(path: str | os.PathLike) -> str:
    """ "float32", "float16" or "int8": what the graph's weights are stored in (read from the
    graph, weights left on disk)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    types = {init.data_type for init in model.graph.initializer}
    if types & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}:
        return "int8"
    if onnx.TensorProto.FLOAT16 in types:
        return "float16"
    return "float32"


def phantom_pixels(cfg: ModelConfig, n: int = 4, seed: int = 0) -> np.ndarray:
    """float32 [n, C, H, W]: preprocessed phantoms from the held-out test split of `seed` (the
    training set of that seed never contains them), for parity checks."""
    from cxrlite.imaging.preprocess import PreprocessConfig, preprocess_batch
    from cxrlite.phantoms.generator import make_phantom_study, study_split

    pre = PreprocessConfig.from_dict(cfg.preprocess)
    images, index = [], 0
    while len(images) < n:
        if study_split(seed, index) == "test":
            _, image = make_phantom_study(seed, index, size=max(64, pre.image_size))
            images.append(image.astype(np.float32) / 255.0)
        index += 1
    return preprocess_batch(images, pre)


def split_batches(pixels: np.ndarray | torch.Tensor, max_batch: int = 4) -> list[np.ndarray]:
    """A batch of 1 first, then batches of up to `max_batch`, so a check exercises the dynamic
    batch dimension with more than one size."""
    array = np.asarray(pixels, dtype=np.float32)
    batches, start = [array[:1]], 1
    while start < len(array):
        batches.append(array[start : start + max_batch])
        start += max_batch
    return [b for b in batches if len(b)]


def parity_figures(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """max abs diff, relative error (max|got - want| / max|want|) and cosine similarity of each
    embedding vector (mean and minimum)."""
    got = np.asarray(got, np.float64).reshape(-1, want.shape[-1])
    want = np.asarray(want, np.float64).reshape(-1, want.shape[-1])
    diff = np.abs(got - want)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    cosine = (got * want).sum(axis=1) / np.maximum(norms, 1e-30)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_error": float(diff.max() / max(float(np.abs(want).max()), 1e-30)),
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
    }


def check_parity(figures: dict[str, Any], precision: str) -> dict[str, Any]:
    """figures + threshold and passed for `precision` (int8 has no threshold: passed is None)."""
    if precision == "float32":
        limit = {"max_abs_diff": FP32_MAX_ABS_DIFF}
    elif precision == "float16":
        limit = {"max_rel_error": FP16_MAX_REL_ERROR}
    else:
        return {**figures, "threshold": None, "passed": None}
    name, value = next(iter(limit.items()))
    return {**figures, "threshold": limit, "passed": bool(figures[name] <= value)}


def validate_vision_onnx(
    onnx_path: str | os.PathLike,
    model: Any,
    pixels_batches: Iterable[np.ndarray | torch.Tensor],
    *,
    providers: Sequence[Any] | None = None,
    session: Any = None,
) -> dict[str, Any]:
    """Compare an exported graph with PyTorch (`model.encode_image`) on the given batches.

    Returns precision, batch sizes, n_images, max_abs_diff, max_rel_error, mean/min cosine,
    threshold and passed (see `check_parity`); raising on failure is the caller's choice."""
    tower, _ = _as_tower(model)
    session = session or onnx_session(onnx_path, providers)
    got, want, sizes = [], [], []
    for batch in pixels_batches:
        pixels = torch.as_tensor(np.asarray(batch, dtype=np.float32))
        with torch.no_grad():
            want.append(tower.encode_image(pixels).float().numpy())
        got.append(session.run([VISION_OUTPUT], {VISION_INPUT: pixels.numpy()})[0])
        sizes.append(int(pixels.shape[0]))
    if not sizes:
        raise ValueError("validate_vision_onnx needs at least one batch of pixels")
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape or g.dtype != np.float32:
            raise ParityError(
                f"{onnx_path}: output {g.dtype}{list(g.shape)} but PyTorch gives float32{list(w.shape)}"
            )
    precision = onnx_precision(onnx_path)
    figures = parity_figures(np.concatenate(got), np.concatenate(want))
    report = {"precision": precision, "batch_sizes": sizes, "n_images": sum(sizes), **figures}
    return check_parity(report, precision)
