"""This machine's main-memory bandwidth, the ceiling of LLM decoding on a CPU.

    cxrlite bench bandwidth --size-mb 512 --threads 2
    python -m cxrlite.bench.bandwidth --size-mb 512 --threads 2      # the same

Generating one token reads every weight once (plus the KV cache), so on a CPU tokens/s cannot
exceed bandwidth / bytes read per token; `cxrlite bench` prints each GGUF variant's tokens/s as a
percentage of that bound.

What is measured, best of `repeats` passes over an array far larger than any CPU cache:
- read: `numpy.max` of a float32 array (a streaming read: the SIMD max is far cheaper than the
  loads, so the time is the read's; `numpy.sum`'s pairwise summation can cost more than the
  loads and would understate the bandwidth), split over `threads` threads (numpy releases the
  GIL in reductions), bytes read / time.
  The reported `read_gbs` is the best of the 1-thread and `threads`-thread figures: one core
  often cannot saturate the memory controllers, and llama.cpp reads with all its threads.
- copy: `numpy.copyto` between two arrays, counted as bytes read + bytes written (what STREAM's
  "copy" counts as 2 x size), for reference.
Other processes on the machine lower both figures; the result records the load average.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_SIZE_MB = 512
DEFAULT_REPEATS = 5


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache (Linux sysfs), or None where it cannot be read. A model
    whose bytes per token fit in it is read from cache, not from main memory, and can beat the
    main-memory bound."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes) if sizes else None


def _best_seconds(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_bandwidth(
    size_mb: int = DEFAULT_SIZE_MB, threads: int | None = None, repeats: int = DEFAULT_REPEATS
) -> dict[str, Any]:
    """{"read_gbs", "read_gbs_1thread", "read_gbs_threads", "copy_gbs", "threads", "size_mb",
    "repeats", "load_average"}: GB/s are 1e9 bytes per second."""
    if size_mb < 1 or repeats < 1:
        raise ValueError(f"size_mb and repeats must be >= 1, got {size_mb}, {repeats}")
    threads = threads or os.cpu_count() or 1
    nbytes = size_mb * 2**20
    source = np.ones(nbytes // 4, dtype=np.float32)  # ones: every page really allocated
    target = np.empty_like(source)
    chunks = np.array_split(source, threads)
    targets = np.array_split(target, threads)
    with ThreadPoolExecutor(threads) as pool:

        def read_all() -> None:
            list(pool.map(np.max, chunks))

        def copy_all() -> None:
            list(pool.map(np.copyto, targets, chunks))

        read_one = nbytes / _best_seconds(source.max, repeats) / 1e9
        read_many = nbytes / _best_seconds(read_all, repeats) / 1e9
        copy = 2 * nbytes / _best_seconds(copy_all, repeats) / 1e9
    result = {
        "read_gbs": max(read_one, read_many),
        "read_gbs_1thread": read_one,
        "read_gbs_threads": read_many,
        "copy_gbs": copy,
        "threads": threads,
        "size_mb": size_mb,
        "repeats": repeats,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    logger.info("memory bandwidth: %s", result)
    return result


@click.command("bandwidth")
@click.option(
    "--size-mb",
    type=click.IntRange(1),
    default=DEFAULT_SIZE_MB,
    show_default=True,
    help="Array size in MiB.",
)
@click.option(
    "--threads", type=click.IntRange(1), default=None, help="Reader threads [default: all]."
)
@click.option(
    "--repeats",
    type=click.IntRange(1),
    default=DEFAULT_REPEATS,
    show_default=True,
    help="Best of N passes.",
)
def bandwidth_command(size_mb: int, threads: int | None, repeats: int) -> None:
    """Main-memory read/copy bandwidth (GB/s), the ceiling of LLM decoding on a CPU; the result
    JSON on stdout."""
    click.echo(json.dumps(measure_bandwidth(size_mb, threads, repeats), indent=2))


if __name__ == "__main__":
    from cxrlite.bench.options import run_subcommand

    run_subcommand("bandwidth")
