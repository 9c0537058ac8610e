"""Every random stream a training step touches: seed it, save it, restore it, or shield it.

Exact resume needs the Python, NumPy, torch CPU and CUDA generators back where they were.
States are kept as tensors and plain tuples so that checkpoints load with weights_only.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block (evaluation) without moving any RNG stream the training loop uses."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def capture_rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """RNG states of this process; for CUDA only the training device's generator.

    Not get_rng_state_all(): under DDP that would create a CUDA context on every GPU of
    the node from every rank.
    """
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    numpy_state = (
        np_name,
        torch.from_numpy(np_keys.astype(np.int64)),
        np_pos,
        np_has_gauss,
        np_gauss,
    )
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    numpy_state = (np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda":
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        else:
            logger.warning(
                "checkpoint has no CUDA RNG state (written on a CPU?): CUDA RNG not restored"
            )
