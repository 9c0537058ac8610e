"""The one preprocessing step between decoded pixels and the vision encoder.

Training, export validation and serving all call `preprocess` with the `PreprocessConfig`
saved beside the model, so a served image is prepared exactly as the training images were.

Steps: resize keeping the aspect ratio so the long side is `image_size`, pad the short side
to a square (centered) with `pad_value`, normalize `(x - mean) / std`, repeat gray to
`channels`. Resizing is Pillow's BILINEAR filter on a float32 ("F" mode) image: Pillow widens
the filter support by the reduction factor when shrinking, so downscaling averages over the
covered source area (antialiased: no aliasing of ribs or anti-scatter grid lines), and
float32 keeps full precision (no rounding to 8 bits in between).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrlite.fileio import atomic_write_bytes

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 4096


@dataclass(frozen=True)
class PreprocessConfig:
    """Saved with every checkpoint and bundle (`to_dict`), restored with `from_dict`."""

    image_size: int = 224
    channels: int = 3
    mean: float = 0.5
    std: float = 0.5
    pad_value: float = 0.0  # in [0, 1] pixel units, before normalization

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"image_size must be an integer, got {size!r}")
        if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {size}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        for name in ("mean", "std", "pad_value"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.std <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if not 0.0 <= self.pad_value <= 1.0:
            raise ValueError(f"pad_value must be in [0, 1] (pixel units), got {self.pad_value}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Rebuild from `to_dict` output; unknown keys are an error (a mistyped key would
        otherwise silently fall back to a default and preprocess differently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown preprocess config keys: {unknown}; expected {sorted(known)}")
        return cls(**dict(data))


def preprocess(pixels: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """HxW pixels in [0, 1] -> float32 [channels, S, S], normalized."""
    gray = _check_pixels(pixels)
    size = cfg.image_size
    height, width = gray.shape
    scale = size / max(height, width)
    new_h = min(size, max(1, round(height * scale)))
    new_w = min(size, max(1, round(width * scale)))
    resized = Image.fromarray(gray).resize((new_w, new_h), Image.Resampling.BILINEAR)

    canvas = np.full((size, size), cfg.pad_value, dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    # Bilinear weights are non-negative and sum to 1, so values stay in [0, 1]; the clip
    # only removes float rounding at the ends.
    canvas[top : top + new_h, left : left + new_w] = np.clip(np.asarray(resized), 0.0, 1.0)
    normalized = (canvas - np.float32(cfg.mean)) / np.float32(cfg.std)
    return np.repeat(normalized[None], cfg.channels, axis=0).astype(
        np.float32, copy=False
    )  # writable


def preprocess_batch(images: Sequence[np.ndarray], cfg: PreprocessConfig) -> np.ndarray:
    """Several HxW images (any sizes) -> float32 [N, channels, S, S]."""
    out = np.empty((len(images), cfg.channels, cfg.image_size, cfg.image_size), np.float32)
    for i, image in enumerate(images):
        out[i] = preprocess(image, cfg)
    return out


def to_display_png(
    image: np.ndarray, path: str | os.PathLike, cfg: PreprocessConfig | None = None
) -> Path:
    """Write an 8-bit gray PNG of what the model sees.

    `image` is either decoded pixels (HxW in [0, 1]) or `preprocess` output ([C, S, S],
    normalized; `cfg` is then needed to undo the normalization).
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 3:
        if cfg is None:
            raise ValueError("a preprocessed [C, S, S] array needs its PreprocessConfig")
        array = array[0] * cfg.std + cfg.mean
    elif array.ndim != 2:
        raise ValueError(f"expected HxW pixels or [C, S, S], got shape {array.shape}")
    gray8 = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(gray8).save(buffer, "PNG")
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _check_pixels(pixels: np.ndarray) -> np.ndarray:
    array = np.asarray(pixels)
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"pixels must be a non-empty HxW array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"pixels must be float in [0, 1] (from load_image), got {array.dtype}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise ValueError("pixels contain NaN or infinity")
    if array.min() < 0.0 or array.max() > 1.0:
        raise ValueError(f"pixels must be in [0, 1], got [{array.min()}, {array.max()}]")
    return array
