"""Build a TensorRT engine from the vision tower ONNX graph and check it against its reference.

Which TensorRT runs on which GPU, and how fp16 is asked for (a builder flag on 10.x, the graph
itself on 11.x), are the version rules of `cxrlite.runtime.tensorrt_runner`, which also runs the
engines; every engine built here records the metadata its `engine_matches` checks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.bundle import VISION_INPUT, Kind, variant_entry
from cxrlite.export.onnx import ParityError, check_parity, onnx_precision, parity_figures
from cxrlite.fileio import atomic_write_bytes
from cxrlite.runtime.tensorrt_runner import (
    TensorRTError,
    TensorRTVisionRunner,
    current_gpu,
    import_tensorrt,
    trt_capabilities,
)

logger = logging.getLogger(__name__)

# TensorRT computes fp32 layers in TF32 by default (10-bit mantissa, like fp16), so every engine
# is held to the fp16 relative-error threshold.
_PARITY_PRECISION = "float16"


def optimization_profile(
    max_batch: int,
    channels: int,
    image_size: int,
    opt_batch: int | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes: batches 1..max_batch, tuned for `opt_batch` (default
    max_batch // 2, or 1: a served request is usually one image, a burst half the maximum)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    opt = max(1, max_batch // 2) if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ValueError(f"opt_batch must be in 1..{max_batch}, got {opt}")
    shape = (channels, image_size, image_size)
    return (1, *shape), (opt, *shape), (max_batch, *shape)


def _parse_onnx(
    trt: Any, builder: Any, trt_logger: Any, onnx_path: Path, strongly_typed: bool
) -> tuple[Any, Any]:
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, trt_logger)
    # parse_from_file resolves external weight files beside the graph.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: TensorRT cannot parse this graph ({errors})")
    return network, parser


def build_engine(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    max_batch: int = 8,
    opt_batch: int | None = None,
    fp16: bool = True,
    timing_cache: str | os.PathLike | None = None,
    workspace_gb: float = 4.0,
    device: int = 0,
) -> dict[str, Any]:
    """Build a TensorRT engine from a vision graph; returns the engine's metadata (GPU, compute
    capability, TensorRT/CUDA versions, profile, precision). `timing_cache` is a file read
    before and written after the build, so later builds on this GPU skip tactic timing."""
    trt = import_tensorrt()
    gpu = current_gpu(device)
    caps = trt_capabilities(gpu["tensorrt_version"], tuple(gpu["compute_capability"]))
    if not caps["supported"]:
        raise TensorRTError(caps["error"])
    onnx_path = Path(onnx_path)
    precision = onnx_precision(onnx_path)
    if precision == "int8":
        raise TensorRTError(f"{onnx_path}: build TensorRT engines from the fp32 or fp16 graph")
    if fp16 and caps["fp16_mode"] == "graph" and precision != "float16":
        raise TensorRTError(
            f"TensorRT {gpu['tensorrt_version']} has no fp16 builder flag: build from the fp16 "
            f"ONNX graph (cxrlite.export.onnx.convert_onnx_fp16), not {onnx_path.name}"
        )
    import torch

    torch.cuda.set_device(device)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # An fp16 graph already says which ops are fp16: build it strongly typed (11 always does;
    # its STRONGLY_TYPED flag is deprecated, so it is only passed to 10.x).
    strongly_typed = precision == "float16" and not caps["strongly_typed"]
    network, _parser = _parse_onnx(trt, builder, trt_logger, onnx_path, strongly_typed)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    # Every GPU TensorRT 10 supports (>= 7.0) has fast fp16; the query is deprecated from 10.5.
    fast_fp16 = getattr(builder, "platform_has_fast_fp16", True)
    use_flag = fp16 and fast_fp16 and caps["fp16_mode"] == "flag" and precision == "float32"
    if use_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    channels, size = (int(d) for d in network.get_input(0).shape[1:3])
    shapes = optimization_profile(max_batch, channels, size, opt_batch)
    profile = builder.create_optimization_profile()
    profile.set_shape(VISION_INPUT, *shapes)
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    logger.info("building a TensorRT engine from %s (batch 1..%d)", onnx_path.name, max_batch)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TensorRTError(f"TensorRT failed to build an engine from {onnx_path} (see its log)")
    atomic_write_bytes(out_path, bytes(serialized))
    if cache_path:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return {
        **gpu,
        "built": datetime.now(UTC).isoformat(timespec="seconds"),
        "onnx": onnx_path.name,
        "onnx_precision": precision,
        "fp16": bool(fp16 or precision == "float16"),
        "fp16_mode": "flag" if use_flag else ("graph" if precision == "float16" else None),
        "profile": {"min": list(shapes[0]), "opt": list(shapes[1]), "max": list(shapes[2])},
        "max_batch": max_batch,
    }


def engine_variant(
    onnx_path: Path,
    staging: Path,
    reference: Callable[[np.ndarray], np.ndarray],
    batches: list,
    fp16: bool,
    **build: Any,
) -> dict[str, Any]:
    """A bundle's vision variant entry: build an engine into staging/vision and check it against
    `reference` (PyTorch at export; the validated fp32 ONNX graph when the engine is added on the
    serving machine). Raises ParityError beyond a relative error of 1e-2."""
    engine = staging / "vision" / f"vision-{'fp16' if fp16 else 'fp32'}.engine"
    meta = build_engine(onnx_path, engine, fp16=fp16, **build)
    runner = TensorRTVisionRunner(engine, meta)
    usable = [b for b in batches if len(b) <= runner.max_batch]
    got = np.concatenate([runner(b) for b in usable])
    want = np.concatenate([reference(b) for b in usable])
    report = check_parity(parity_figures(got, want), _PARITY_PRECISION)
    report.update(batch_sizes=[len(b) for b in usable], n_images=int(len(got)))
    if not report["passed"]:
        raise ParityError(f"{engine.name}: relative error {report['max_rel_error']:.3g} > 1e-2")
    dtype = "float16" if meta["fp16"] else "float32"
    rel = engine.relative_to(staging).as_posix()
    return variant_entry(
        rel, Kind.TENSORRT, dtype, engine.stat().st_size, engine=meta, parity=report
    )
