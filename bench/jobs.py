"""What a latency benchmark is made of: its settings, and the jobs it runs, one per backend.

A job is a plain JSON-able dict, so that it can travel to a worker process
(`cxrlite.bench.worker`) and back:

    {"kind": "vision" | "llm", "spec": backend name, "bundle": path, "runs", "warmup",
     "threads", "checkpoint",
     # LLM jobs only:
     "vision": the vision backend in front of the LLM, "image_file": the radiograph's bytes,
     "max_tokens", "n_ctx", "n_gpu_layers", "repeated_image"}

Vision jobs time the tower alone (`cxrlite.bench.vision_phase`); LLM jobs time a whole request
and the repeated-image path (`cxrlite.bench.llm_phase`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrlite.errors import CxrliteError

DEFAULT_VISION = ("torch", "torch-bf16", "onnx-fp32", "onnx-fp16", "onnx-int8", "tensorrt")
REPEAT_QUESTION = "Is there a pleural effusion?"  # the follow-up question about the same image


class BenchError(CxrliteError, ValueError):
    """A benchmark cannot run as asked (bad bundle, no backend to measure, bad settings)."""


@dataclass
class BenchSettings:
    runs: int = 10
    warmup: int = 2
    max_tokens: int = 64
    vision_backends: tuple[str, ...] = DEFAULT_VISION
    llm_variants: tuple[str, ...] | None = None  # None: "torch" + every LLM variant of the bundle
    threads: int | None = None
    n_gpu_layers: int | None = None
    n_ctx: int | None = None
    checkpoint: str | None = None  # the torch reference's checkpoint, if it moved
    image: str | None = None  # a radiograph file; default a 1024 px phantom PNG
    isolate: bool = True
    bandwidth_mb: int = 512  # 0 skips the bandwidth measurement
    repeated_image: bool = True  # TTFT of a repeated image (3 one-token requests a run)

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.max_tokens < 1:
            raise BenchError(
                f"runs must be >= 1, warmup >= 0 and max_tokens >= 1 (got {self.runs}, "
                f"{self.warmup}, {self.max_tokens})"
            )


def llm_specs(bundle: Any, settings: BenchSettings) -> list[str]:
    """The LLM backends to time: the settings' list, else the torch reference + every variant."""
    if settings.llm_variants is not None:
        return list(settings.llm_variants)
    return ["torch", *bundle.llm_variants]


def build_jobs(
    bundle: Any, settings: BenchSettings, image_file: Path, e2e_vision: str
) -> list[dict[str, Any]]:
    """Every job of a benchmark, vision jobs first; LLM jobs run behind `e2e_vision`."""
    common = {
        "bundle": str(bundle.path),
        "runs": settings.runs,
        "warmup": settings.warmup,
        "threads": settings.threads,
        "checkpoint": settings.checkpoint,
    }
    jobs = [{**common, "kind": "vision", "spec": s} for s in settings.vision_backends]
    jobs += [
        {
            **common,
            "kind": "llm",
            "spec": s,
            "vision": e2e_vision,
            "image_file": str(image_file),
            "max_tokens": settings.max_tokens,
            "n_ctx": settings.n_ctx,
            "n_gpu_layers": settings.n_gpu_layers,
            "repeated_image": settings.repeated_image,
        }
        for s in llm_specs(bundle, settings)
    ]
    return jobs


def image_bytes(path: str | None) -> tuple[bytes, str]:
    """The benchmark radiograph: the user's file, else a 1024 px phantom PNG (held-out split)."""
    if path is not None:
        return Path(path).read_bytes(), Path(path).name
    from cxrlite.imaging.write import png_bytes
    from cxrlite.phantoms.generator import make_phantom_study

    _, pixels = make_phantom_study(0, 1, size=1024)
    return png_bytes(pixels), "phantom-1024px.png"


def ms(seconds: float) -> float:
    return seconds * 1000.0


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """fn(*args) and the milliseconds it took."""
    start = time.perf_counter()
    out = fn(*args)
    return out, ms(time.perf_counter() - start)
