"""Vision backends: preprocessed pixels float32 [B, C, H, W] -> image embeddings [B, n, n_embd].

- `OnnxVision`: any ONNX variant of the bundle through onnxruntime (CUDA/CPU providers as
  `cxrlite.runtime.onnx_runner.default_providers` orders them; TensorRT's provider when asked for).
- `TensorRTVision`: a prebuilt engine, only where `engine_matches` says it was built for this GPU.
- `TorchVision`: the PyTorch reference (the checkpoint's vision encoder + bridger).

onnxruntime sessions are thread-safe, TensorRT execution contexts are not; the runtime calls
`encode` under one lock per backend either way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from cxrlite.bundle import Key

logger = logging.getLogger(__name__)


@runtime_checkable
class VisionBackend(Protocol):
    name: str  # the bundle variant ("onnx-fp32", "tensorrt-fp16") or "torch-fp32"
    device: str  # "cpu" or "cuda"

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """float32 [B, C, H, W] -> float32 [B, n_image_tokens, n_embd]."""
        ...


def _as_batch(pixels: np.ndarray) -> np.ndarray:
    array = np.ascontiguousarray(pixels, dtype=np.float32)
    if array.ndim != 4 or array.shape[0] < 1:
        raise ValueError(f"pixels must be float32 [B, C, H, W], got shape {array.shape}")
    return array


class OnnxVision:
    def __init__(
        self,
        path: str | os.PathLike,
        name: str,
        providers: list[Any] | None = None,
        threads: int | None = None,
    ) -> None:
        from cxrlite.bundle import VISION_INPUT, VISION_OUTPUT
        from cxrlite.runtime.onnx_runner import onnx_session

        self.name, self.path = name, Path(path)
        self.session = onnx_session(self.path, providers, threads=threads)
        self._io = (VISION_INPUT, VISION_OUTPUT)
        first = self.session.get_providers()[0]
        self.device = "cpu" if first == "CPUExecutionProvider" else "cuda"
        self.providers = list(self.session.get_providers())

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        input_name, output_name = self._io
        out = self.session.run([output_name], {input_name: _as_batch(pixels)})[0]
        return np.asarray(out, dtype=np.float32)


class TensorRTVision:
    def __init__(self, path: str | os.PathLike, name: str, meta: dict[str, Any]) -> None:
        from cxrlite.runtime.tensorrt_runner import TensorRTVisionRunner

        self.name, self.path, self.device = name, Path(path), "cuda"
        self.runner = TensorRTVisionRunner(path, meta)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        batch = _as_batch(pixels)
        step = self.runner.max_batch  # the engine's profile caps the batch: split bigger ones
        return np.concatenate(
            [self.runner(batch[i : i + step]) for i in range(0, len(batch), step)]
        )


class TorchVision:
    """`tower` is anything with `encode_image` (a CXRVLM, or cxrlite.model.vlm.VisionTower)."""

    def __init__(self, tower: Any, name: str = "torch-fp32", device: str | None = None) -> None:
        import torch

        self.name, self.tower = name, tower.eval()
        self.device = device or next(tower.parameters()).device.type
        self._torch = torch

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            x = torch.tensor(_as_batch(pixels), device=self.device)
            return self.tower.encode_image(x).float().cpu().numpy()


def open_vision(
    bundle: Any,
    choice: Any,
    *,
    threads: int | None = None,
    tower: Any = None,
) -> VisionBackend:
    """The backend for a plan `Choice` (cxrlite.runtime.plan); `tower` is the reference model
    for the torch backend."""
    from cxrlite.runtime.onnx_runner import default_providers

    if choice.backend == "torch":
        if tower is None:
            raise ValueError("the torch vision backend needs the reference model")
        return TorchVision(tower)
    path = bundle.variant_file(Key.VISION, choice.variant)
    if choice.backend == "tensorrt":
        engine = bundle.variant(Key.VISION, choice.variant).engine
        return TensorRTVision(path, choice.variant, engine)
    return OnnxVision(path, choice.variant, default_providers(), threads=threads)
