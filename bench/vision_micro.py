"""Vision tower micro-benchmark: every vision backend of a bundle at several batch sizes.

    python -m cxrlite.bench.vision_micro BUNDLE --backends torch,onnx-fp32,onnx-fp16,onnx-int8 \
        --batch-sizes 1,2,4,8 --runs 10 --warmup 2 --threads 2 --out vision_micro.json

Per backend and batch size: p50/p90/p99 milliseconds per call and images/s at the median, on
random preprocessed-looking pixels (the tower's cost does not depend on pixel values). All
backends share this process, one at a time; `cxrlite bench` measures their memory in isolation.
A backend that cannot run here (no checkpoint for torch, no GPU for TensorRT) is listed as skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxrlite.bench.report import summarize

logger = logging.getLogger(__name__)

DEFAULT_BATCHES = (1, 2, 4, 8)


def bench_vision(
    bundle_dir: str | os.PathLike,
    backends: Sequence[str] = ("torch", "onnx-fp32", "onnx-fp16", "onnx-int8", "tensorrt"),
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    *,
    runs: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """{"backends": {name: {"device", "batches": {size: {"ms": summary, "images_per_s"}}}},
    "skipped": {spec: why}}."""
    from cxrlite.bench.latency import open_vision_spec
    from cxrlite.bundle import load_bundle
    from cxrlite.runtime.plan import BackendError

    if runs < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("runs and batch sizes must be >= 1, warmup >= 0")
    bundle = load_bundle(bundle_dir, verify="size")
    pre = bundle.preprocess
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal(
        (max(batch_sizes), pre.channels, pre.image_size, pre.image_size), np.float32
    )
    out: dict[str, Any] = {"bundle": str(bundle.path), "backends": {}, "skipped": {}}
    for spec in backends:
        try:
            vision = open_vision_spec(bundle, spec, threads, checkpoint)
        except (BackendError, ImportError, OSError, ValueError, RuntimeError) as e:
            out["skipped"][spec] = str(e)
            continue
        batches = {}
        for size in batch_sizes:
            batch = pixels[:size]
            times = []
            for i in range(warmup + runs):
                start = time.perf_counter()
                vision.encode(batch)
                if i >= warmup:
                    times.append(1000.0 * (time.perf_counter() - start))
            stats = summarize(times)
            batches[str(size)] = {"ms": stats, "images_per_s": 1000.0 * size / stats["p50"]}
        out["backends"][vision.name] = {"device": vision.device, "batches": batches}
        del vision
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Vision tower micro-benchmark.")
    parser.add_argument("bundle")
    parser.add_argument("--backends", default="torch,onnx-fp32,onnx-fp16,onnx-int8,tensorrt")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpoint", default=None, help="source checkpoint for torch")
    parser.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    result = bench_vision(
        args.bundle,
        [b.strip() for b in args.backends.split(",") if b.strip()],
        [int(b) for b in args.batch_sizes.split(",") if b.strip()],
        runs=args.runs,
        warmup=args.warmup,
        threads=args.threads,
        checkpoint=args.checkpoint,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vision tower: ms p50/p99 (images/s)", title_justify="left")
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    table.add_column("backend")
    for size in sizes:
        table.add_column(f"batch {size}", justify="right")
    for name, entry in result["backends"].items():
        cells = []
        for size in sizes:
            cell = entry["batches"][str(size)]
            ms = cell["ms"]
            cells.append(f"{ms['p50']:.2f}/{ms['p99']:.2f} ({cell['images_per_s']:.1f})")
        table.add_row(name, *cells)
    console = Console()
    console.print(table)
    for spec, why in result["skipped"].items():
        console.print(f"[dim]skipped {spec}: {why}[/]")
    if args.out:
        from cxrlite.fileio import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
