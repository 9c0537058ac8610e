"""onnxruntime sessions for the vision graph: execution providers in preference order, all graph
optimizations on."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cxrlite.runtime.plan import BackendError


def default_providers(available: Sequence[str] | None = None, tensorrt: bool = False) -> list[str]:
    """Execution providers in preference order among those onnxruntime has: CUDA, else CPU.
    onnxruntime's TensorRT provider builds an engine at session start (minutes), so it is used
    only when asked for."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if tensorrt:
        wanted.insert(0, "TensorrtExecutionProvider")
    return [p for p in wanted if p in available] or ["CPUExecutionProvider"]


def onnx_session(
    path: str | os.PathLike, providers: Sequence[Any] | None = None, *, threads: int | None = None
) -> Any:
    """An onnxruntime InferenceSession with all graph optimizations; `providers` (names or
    (name, options) pairs) defaults to `default_providers()`."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            str(path), options, providers=list(providers or default_providers())
        )
    except Exception as e:  # onnxruntime raises its own untyped errors (Fail, InvalidGraph, ...)
        raise BackendError(f"{path}: onnxruntime cannot load this graph ({e})") from e
