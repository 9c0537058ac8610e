"""Peak memory of one benchmark job: resident set (and GPU use) sampled in a thread.

In an isolated job (its own fresh process) the peak resident set is the larger of the samples
and the kernel's own peak (VmHWM), which catches spikes between two samples: that is the
backend's true peak, imports included. In a shared process only RSS deltas from the job's start
mean anything: memory freed by earlier jobs and reused is not counted again, so those figures
are lower bounds. GPU memory is device-wide use from `torch.cuda.mem_get_info`, minus the use at
the job's start.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


def mb(nbytes: float) -> float:
    """Bytes as MiB, rounded to 0.1."""
    return round(nbytes / 2**20, 1)


class MemorySampler:
    """Peak RSS (and, with `gpu`, device-wide GPU use) of this process from its start, sampled
    every `interval` s. A context manager: sampling runs between enter and exit."""

    def __init__(self, gpu: bool = False, interval: float = 0.005) -> None:
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self._gpu = gpu
        self.baseline_rss = self._process.memory_info().rss
        self.baseline_gpu = self._gpu_used()
        self.peak_rss, self.peak_gpu = self.baseline_rss, self.baseline_gpu
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def _gpu_used(self) -> int | None:
        if not self._gpu:
            return None
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(total - free)

    def sample(self) -> int:
        """One sample now; the current RSS in bytes."""
        rss = self._process.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        gpu = self._gpu_used()
        if gpu is not None:
            self.peak_gpu = max(self.peak_gpu or 0, gpu)
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def figures(self, isolated: bool) -> dict[str, Any]:
        """The job's memory figures for the result JSON (see the module docstring)."""
        peak = self.peak_rss
        if isolated:  # the kernel's own peak catches spikes between two samples
            peak = max(peak, kernel_peak_rss() or 0)
        out = {
            "method": "subprocess peak RSS" if isolated else "in-process RSS delta",
            "peak_rss_mb": mb(peak),
            "baseline_rss_mb": mb(self.baseline_rss),
            "peak_delta_mb": mb(peak - self.baseline_rss),
        }
        if self.baseline_gpu is not None:
            out["gpu_peak_delta_mb"] = mb((self.peak_gpu or 0) - self.baseline_gpu)
            out["gpu_peak_used_mb"] = mb(self.peak_gpu or 0)
        return out


def kernel_peak_rss() -> int | None:
    """VmHWM, this process's own peak RSS. Not ru_maxrss: Linux carries that across fork and
    exec, so a worker would report its parent's peak when the parent was bigger."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None
