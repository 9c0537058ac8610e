"""Pick the device (and the training autocast precision) in one place, logging the reason why.

Every part that runs PyTorch (training, the torch and GPTQ backends of the runtime, evaluation,
the quantizer, the benchmarks) asks `resolve_device` and passes the answer on explicitly;
nothing else looks at `torch.cuda.is_available()` to choose a device.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)


class DeviceError(CxrliteError, ValueError):
    """The requested device does not exist on this machine."""


class DeviceChoice(NamedTuple):
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    reason: str


def _cuda_choice(device: torch.device) -> DeviceChoice:
    index = device.index if device.index is not None else torch.cuda.current_device()
    name = torch.cuda.get_device_name(index)
    if torch.cuda.is_bf16_supported():
        return DeviceChoice(device, torch.bfloat16, f"CUDA device {index} ({name}): bf16 autocast")
    # Pre-Ampere GPUs (V100, T4) lack bf16; fp16 autocast needs loss scaling, which the
    # engine adds with torch.amp.GradScaler whenever the dtype is float16.
    return DeviceChoice(
        device, torch.float16, f"CUDA device {index} ({name}) has no bf16: fp16 autocast"
    )


def resolve_device(
    preferred: str | torch.device | None = None,
    *,
    local_rank: int | None = None,
    purpose: str = "training",
) -> DeviceChoice:
    """Resolve "auto"/None, "cpu", "cuda", "cuda:N" or "mps" to a device and autocast dtype.

    None/"auto" takes CUDA when present (GPU `local_rank` under torchrun), else the CPU.
    The CPU trains in fp32: CPU bf16 autocast is slower than fp32 on most CPUs and changes
    numerics between machines. An explicit device that is absent raises DeviceError.
    `purpose` only names the user in the log line ("training", "inference", ...).
    """
    text = "auto" if preferred is None else str(preferred).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            choice = _cuda_choice(torch.device("cuda", local_rank or 0))
        else:
            choice = DeviceChoice(torch.device("cpu"), None, "no CUDA device: CPU, fp32")
    else:
        try:
            device = torch.device(text)
        except RuntimeError as err:
            raise DeviceError(f"unknown device {preferred!r}: {err}") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(f"device {preferred!r} requested but CUDA is not available")
            if device.index is None and local_rank is not None:
                device = torch.device("cuda", local_rank)
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise DeviceError(
                    f"device {preferred!r} requested but only "
                    f"{torch.cuda.device_count()} CUDA device(s) exist"
                )
            choice = _cuda_choice(device)
        elif device.type == "mps":
            if not torch.backends.mps.is_available():
                raise DeviceError(f"device {preferred!r} requested but MPS is not available")
            choice = DeviceChoice(device, None, "Apple MPS: fp32")
        elif device.type == "cpu":
            choice = DeviceChoice(device, None, "CPU requested: fp32")
        else:
            raise DeviceError(f"unsupported device {preferred!r}")
    logger.info("%s device %s (%s)", purpose, choice.device, choice.reason)
    return choice
