"""Vision tower micro-benchmark: every vision backend of a bundle at several batch sizes.

    cxrlite bench vision BUNDLE --backends torch,onnx-fp32,onnx-fp16,onnx-int8 \
        --batch-sizes 1,2,4,8 --runs 10 --warmup 2 --threads 2 --out vision_micro.json
    python -m cxrlite.bench.vision_micro BUNDLE                     # the same, defaults

Per backend and batch size: p50/p90/p99 milliseconds per call and images/s at the median, on
random preprocessed-looking pixels (the tower's cost does not depend on pixel values). All
backends share this process, one at a time; `cxrlite bench` measures their memory in isolation.
A backend that cannot run here (no checkpoint for torch, no GPU for TensorRT) is listed as skipped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from cxrlite.bench.options import int_list, names, run_subcommand
from cxrlite.bench.report import summarize

logger = logging.getLogger(__name__)

DEFAULT_BACKENDS = ("torch", "onnx-fp32", "onnx-fp16", "onnx-int8", "tensorrt")
DEFAULT_BATCHES = (1, 2, 4, 8)


def bench_vision(
    bundle_dir: str | os.PathLike,
    backends: Sequence[str] = DEFAULT_BACKENDS,
    batch_sizes: Sequence[int] = DEFAULT_BATCHES,
    *,
    runs: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """{"backends": {name: {"device", "batches": {size: {"ms": summary, "images_per_s"}}}},
    "skipped": {spec: why}}. The PyTorch tower runs where `cxrlite.device.resolve_device` says."""
    from cxrlite.bench.backends import open_vision_spec
    from cxrlite.bundle import load_bundle
    from cxrlite.device import resolve_device
    from cxrlite.runtime.plan import BackendError

    if runs < 1 or warmup < 0 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("runs and batch sizes must be >= 1, warmup >= 0")
    bundle = load_bundle(bundle_dir, verify="size")
    pre = bundle.preprocess
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal(
        (max(batch_sizes), pre.channels, pre.image_size, pre.image_size), np.float32
    )
    device = resolve_device(None, purpose="benchmark").device
    out: dict[str, Any] = {"bundle": str(bundle.path), "backends": {}, "skipped": {}}
    for spec in backends:
        try:
            vision = open_vision_spec(bundle, spec, threads, checkpoint, device=device)
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


def print_table(result: dict[str, Any], sizes: Sequence[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vision tower: ms p50/p99 (images/s)", title_justify="left")
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


# fmt: off
@click.command("vision")
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--backends", default=",".join(DEFAULT_BACKENDS), show_default=True,
              help="Comma-separated vision backends.")
@click.option("--batch-sizes", default=",".join(map(str, DEFAULT_BATCHES)), show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--runs", type=click.IntRange(1), default=10, show_default=True, help="Timed runs.")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True,
              help="Untimed runs first.")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads [default: all].")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="Source checkpoint for torch, if it moved since export.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result JSON here.")
def vision_command(bundle: Path, backends: str, batch_sizes: str, runs: int, warmup: int,
                   threads: int | None, checkpoint: str | None, out: Path | None) -> None:
    """The vision tower of every backend of BUNDLE at several batch sizes: ms per call and
    images/s."""
    sizes = int_list(batch_sizes, "--batch-sizes")
    result = bench_vision(bundle, names(backends) or (), sizes, runs=runs, warmup=warmup,
                          threads=threads, checkpoint=checkpoint)
    print_table(result, sizes)
    if out is not None:
        from cxrlite.fileio import write_json

        write_json(out, result)
# fmt: on


if __name__ == "__main__":
    run_subcommand("vision")
