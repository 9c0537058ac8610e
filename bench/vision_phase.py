"""The image side of a request, timed: decoding and preprocessing the radiograph, and the
vision tower alone on one image (one job per vision backend).

The tower's cost does not depend on pixel values, so vision jobs feed it seeded random pixels of
the bundle's input shape; the image phase times the real radiograph's bytes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxrlite.bench.backends import open_vision_spec
from cxrlite.bench.jobs import BenchError, timed
from cxrlite.bench.memory import MemorySampler, mb
from cxrlite.bench.report import summarize


def image_phase(data: bytes, pre: Any, runs: int, warmup: int) -> dict[str, Any]:
    """Decode (PNG/JPEG/DICOM bytes to pixels) and preprocess (to model pixels) milliseconds,
    summarized over `runs` after `warmup`."""
    from cxrlite.imaging.decode import load_image
    from cxrlite.imaging.preprocess import preprocess

    decode, prep = [], []
    for i in range(warmup + runs):
        image, t_decode = timed(load_image, data)
        _, t_pre = timed(preprocess, image.pixels, pre)
        if i >= warmup:
            decode.append(t_decode)
            prep.append(t_pre)
    return {
        "decode_ms": summarize(decode),
        "preprocess_ms": summarize(prep),
        "shape": list(image.pixels.shape),
        "bytes": len(data),
    }


def vision_job(
    job: dict[str, Any], bundle: Any, memory: MemorySampler, device: Any
) -> dict[str, Any]:
    """Raw milliseconds of the vision backend `job["spec"]` encoding one image per call, and the
    memory its opening took."""
    pre = bundle.preprocess
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, pre.channels, pre.image_size, pre.image_size), np.float32)
    before = memory.sample()
    vision = open_vision_spec(
        bundle, job["spec"], job.get("threads"), job.get("checkpoint"), device=device
    )
    loaded = memory.sample()
    times = []
    for i in range(job["warmup"] + job["runs"]):
        out, elapsed = timed(vision.encode, pixels)
        if i >= job["warmup"]:
            times.append(elapsed)
    want = (1, bundle.config.n_image_tokens, bundle.config.llm.hidden_size)
    if out.shape != want:
        raise BenchError(f"vision {job['spec']} returned {out.shape}, not {want}")
    return {
        "name": vision.name,
        "device": vision.device,
        "vision_ms": times,
        "load_delta_mb": mb(loaded - before),
    }
