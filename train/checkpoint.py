"""Atomic training checkpoints: a folder per step, complete or absent.

A checkpoint is written into a hidden temp folder and renamed to `step_00000042` only once
every file in it is on disk, so a crash mid-write leaves a `.tmp-*` folder that readers
ignore, never a half-written checkpoint under a real name. Older checkpoints are renamed
away before deletion for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from cxrlite.errors import CxrliteError
from cxrlite.fileio import atomic_open

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# model.pt: trainable weights and buffers; optimizer.pt: AdamW moments; state.pt: step,
# scheduler, data order, RNG, metrics so far.
CHECKPOINT_FILES = ("model.pt", "optimizer.pt", "state.pt")


class CheckpointError(CxrliteError, RuntimeError):
    """A checkpoint is unreadable or does not belong to the run being resumed."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first. Temp folders are never listed."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if not match or not entry.is_dir():
            continue
        if all((entry / name).is_file() for name in CHECKPOINT_FILES):
            found.append((int(match.group(1)), entry))
        else:
            logger.warning("skipping incomplete checkpoint folder %s", entry)
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(root)
    return checkpoints[-1][1] if checkpoints else None


def remove_temp_dirs(root: str | os.PathLike) -> int:
    """Delete leftovers of interrupted writes; only call when no other writer is running."""
    root = Path(root)
    removed = 0
    if root.is_dir():
        for entry in root.iterdir():
            if entry.name.startswith(TEMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def _fsync_dir(path: Path) -> None:
    # The rename is only durable once the parent folder's entry is flushed (POSIX).
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint(
    root: str | os.PathLike, step: int, payload: dict[str, Any], *, keep: int
) -> Path:
    """Write `payload` (file name -> object for torch.save) as checkpoint `step`, atomically.

    Keeps the newest `keep` checkpoints. A checkpoint already present for `step` holds the
    same state (steps are deterministic), so it is kept and not rewritten.
    """
    missing = [name for name in CHECKPOINT_FILES if name not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {missing}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    if final.is_dir() and all((final / name).is_file() for name in CHECKPOINT_FILES):
        logger.info("checkpoint %s already exists; not rewriting it", final)
        return final
    tmp = root / f"{TEMP_PREFIX}{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        for name, obj in payload.items():
            with atomic_open(tmp / name, "wb") as f:
                torch.save(obj, f)
        with atomic_open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump({"step": step, "written_at": time.time()}, f)
        _fsync_dir(tmp)
        if final.exists():  # an incomplete folder under the final name: not ours to trust
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    for _, path in list_checkpoints(root)[:-keep]:
        doomed = path.with_name(f"{TEMP_PREFIX}delete-{path.name}-{time.monotonic_ns()}")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load every file of a checkpoint (weights_only: a checkpoint cannot run code)."""
    path = Path(path)
    loaded = {}
    for name in CHECKPOINT_FILES:
        try:
            loaded[name] = torch.load(path / name, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises several types for corrupt/truncated files
            raise CheckpointError(f"cannot read checkpoint file {path / name}: {err}") from err
    return loaded
