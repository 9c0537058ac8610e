"""Run a TensorRT vision engine, and the rules for where an engine can run (CUDA GPUs only).

What TensorRT can do depends on its version and the GPU, and an engine only runs on the GPU
model and TensorRT version that built it, so the version rules are pure functions (tested
everywhere) and every engine carries the metadata `engine_matches` checks:
- TensorRT < 10 lacks the name-based tensor API used here.
- 10.0-10.4 run on compute capability >= 7.0; 10.5 removed Volta (7.0), so a V100 needs
  TensorRT <= 10.4 (or onnxruntime's CUDA provider). 11.x also starts at 7.5.
- 10.x: fp16 through BuilderFlag.FP16 on an fp32 graph ("flag"), or an fp16 graph built
  strongly typed. 11.x removed the flag: networks are always strongly typed, so fp16 must be in
  the graph ("graph"; the bundle's fp16 ONNX variant, which cxrlite.export.onnx writes).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.bundle import VISION_INPUT, VISION_OUTPUT
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "tensorrt>=10"'
VOLTA_INSTALL_HINT = 'pip install "tensorrt>=10,<10.5"'


class TensorRTError(CxrliteError, RuntimeError):
    """TensorRT is missing, cannot run on this GPU, or failed to build or load an engine."""


def parse_version(version: str) -> tuple[int, int, int]:
    numbers = [int(n) for n in re.findall(r"\d+", version)[:3]]
    if not numbers:
        raise ValueError(f"not a TensorRT version: {version!r}")
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def trt_capabilities(version: str, compute_capability: tuple[int, int]) -> dict[str, Any]:
    """What TensorRT `version` offers on a GPU of `compute_capability` (pure).

    Returns supported, error (why not, with the fix), fp16_mode ("flag" or "graph"),
    strongly_typed (forced: 11.x) and min_compute_capability."""
    major, minor, _ = parse_version(version)
    cc = tuple(compute_capability)
    info: dict[str, Any] = {"version": version, "compute_capability": list(cc)}
    if major < 10:
        error = (
            f"TensorRT {version} is too old; cxrlite needs TensorRT 10 or newer ({INSTALL_HINT})"
        )
        info.update(fp16_mode=None, strongly_typed=False, min_compute_capability=None)
        return {**info, "supported": False, "error": error}
    minimum = (7, 0) if (major, minor) < (10, 5) else (7, 5)
    fp16_mode = "flag" if major == 10 else "graph"
    info.update(
        fp16_mode=fp16_mode, strongly_typed=major >= 11, min_compute_capability=list(minimum)
    )
    if cc < minimum:
        if cc == (7, 0):
            error = (
                f"TensorRT {version} does not support Volta GPUs (compute capability 7.0, e.g. "
                f"V100): 10.5 removed them. Install TensorRT 10.4 or older ({VOLTA_INSTALL_HINT}) "
                "or use the ONNX variant with onnxruntime's CUDA provider."
            )
        else:
            error = (
                f"TensorRT {version} needs compute capability {minimum[0]}.{minimum[1]} or "
                f"newer; this GPU is {cc[0]}.{cc[1]}. Use the ONNX variant with onnxruntime."
            )
        return {**info, "supported": False, "error": error}
    return {**info, "supported": True, "error": None}


def engine_matches(meta: dict[str, Any], current_gpu: dict[str, Any]) -> tuple[bool, str]:
    """Whether an engine built as `meta` describes can run where `current_gpu` (from
    `current_gpu()`) describes; the reason names what differs."""
    built, here = meta.get("tensorrt_version"), current_gpu.get("tensorrt_version")
    if built != here:
        return False, f"engine built with TensorRT {built}, this machine has {here}; rebuild it"
    built_cc = list(meta.get("compute_capability") or [])
    here_cc = list(current_gpu.get("compute_capability") or [])
    if built_cc != here_cc:
        return False, (
            f"engine built for compute capability {built_cc} ({meta.get('gpu_name')}), this GPU "
            f"is {here_cc} ({current_gpu.get('gpu_name')}); rebuild it"
        )
    if meta.get("gpu_name") != current_gpu.get("gpu_name"):
        # Same architecture: TensorRT loads it, though its tactics were timed on another model.
        return True, f"built on {meta.get('gpu_name')}, runs on {current_gpu.get('gpu_name')}"
    return True, "same GPU and TensorRT version"


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTError(f"TensorRT is not installed ({INSTALL_HINT})") from None
    return trt


def current_gpu(device: int = 0) -> dict[str, Any]:
    """GPU name, compute capability, CUDA and TensorRT versions of this machine."""
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("TensorRT needs a CUDA GPU; none is visible to PyTorch")
    trt = import_tensorrt()
    return {
        "gpu_name": torch.cuda.get_device_name(device),
        "compute_capability": list(torch.cuda.get_device_capability(device)),
        "cuda_version": torch.version.cuda,
        "tensorrt_version": trt.__version__,
    }


def require_tensorrt(device: int = 0) -> dict[str, Any]:
    """This machine's GPU description, or TensorRTError when TensorRT cannot run here."""
    gpu = current_gpu(device)
    caps = trt_capabilities(gpu["tensorrt_version"], tuple(gpu["compute_capability"]))
    if not caps["supported"]:
        raise TensorRTError(caps["error"])
    return gpu


class TensorRTVisionRunner:
    """Runs a vision engine: float32 pixels [B, C, H, W] -> float32 embeddings, B <= max_batch.
    Buffers are torch CUDA tensors (no pycuda); the stream is PyTorch's current stream."""

    def __init__(
        self, engine_path: str | os.PathLike, meta: dict[str, Any] | None = None, device: int = 0
    ) -> None:
        import torch

        trt = import_tensorrt()
        here = current_gpu(device)
        if meta is not None:
            ok, reason = engine_matches(meta, here)
            if not ok:
                raise TensorRTError(f"{engine_path}: {reason}")
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise TensorRTError(f"{engine_path}: TensorRT cannot load this engine (see its log)")
        self.context = self.engine.create_execution_context()
        self.max_batch = int(self.engine.get_tensor_profile_shape(VISION_INPUT, 0)[2][0])

    def __call__(self, pixels: Any) -> np.ndarray:
        import torch

        x = torch.as_tensor(np.asarray(pixels, dtype=np.float32)).to(self.device).contiguous()
        if not 1 <= x.shape[0] <= self.max_batch:
            raise ValueError(f"batch of {x.shape[0]} images; this engine takes 1..{self.max_batch}")
        self.context.set_input_shape(VISION_INPUT, tuple(x.shape))
        out = torch.empty(
            tuple(self.context.get_tensor_shape(VISION_OUTPUT)),
            dtype=torch.float32,
            device=self.device,
        )
        self.context.set_tensor_address(VISION_INPUT, x.data_ptr())
        self.context.set_tensor_address(VISION_OUTPUT, out.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("TensorRT failed to run the engine")
        stream.synchronize()
        return out.cpu().numpy()
