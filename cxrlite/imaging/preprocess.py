"""The one preprocessing step between decoded pixels and the vision encoder.

Training, export validation and serving all call `preprocess` with the `PreprocessConfig`
saved beside the model, so a served image is prepared exactly as the training images were.

Steps: optionally stretch the image's own range to [0, 1] (`minmax`); resize and make it square,
either keeping the whole image (`resize="pad"`: long side to `image_size`, short side padded with
`pad_value`, centered) or filling the square (`resize="crop"`: short side to `image_size`, the
centre cropped, as transformers' CLIP / DINOv2 image processors do) or both sides to `image_size`
(`resize="stretch"`, Gemma 3's processor); repeat gray to `channels`;
normalize `(x - mean) / std` with one value or one per channel. A published model's own
preprocessing is a set of these fields (its interpolation, crop, mean and std).

Resizing is Pillow's filter (`interpolation`: bilinear, bicubic or lanczos) on a float32 ("F"
mode) image: Pillow widens the filter support by the reduction factor when shrinking, so
downscaling averages over the covered source area (antialiased: no aliasing of ribs or
anti-scatter grid lines), and float32 keeps full precision (no rounding to 8 bits in between).
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
RESIZE_MODES = ("pad", "crop", "stretch")
INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,  # CXR-LLaVA's CLIPImageProcessor(resample=True)
}


@dataclass(frozen=True)
class PreprocessConfig:
    """Saved with every checkpoint and bundle (`to_dict`), restored with `from_dict`."""

    image_size: int = 224
    channels: int = 3
    mean: float | tuple[float, ...] = 0.5  # one value, or one per channel
    std: float | tuple[float, ...] = 0.5
    pad_value: float = 0.0  # in [0, 1] pixel units, before normalization
    resize: str = "pad"
    interpolation: str = "bilinear"
    minmax: bool = False  # stretch each image's own min..max to 0..1 first

    def __post_init__(self) -> None:
        size = self.image_size
        if isinstance(size, bool) or not isinstance(size, int | np.integer):
            raise ValueError(f"image_size must be an integer, got {size!r}")
        if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {size}")
        if self.channels not in (1, 3) or isinstance(self.channels, bool):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, list | tuple):
                if len(value) != self.channels:
                    raise ValueError(f"{name} has {len(value)} values for {self.channels} channels")
                object.__setattr__(self, name, tuple(value))
        for name, value in self._numbers():
            if isinstance(value, bool) or not isinstance(value, int | float | np.floating):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if min(self._per_channel("std")) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if not isinstance(self.minmax, bool):
            raise ValueError(f"minmax must be true or false, got {self.minmax!r}")
        if not 0.0 <= self.pad_value <= 1.0:
            raise ValueError(f"pad_value must be in [0, 1] (pixel units), got {self.pad_value}")

    def _numbers(self) -> list[tuple[str, Any]]:
        values = [("pad_value", self.pad_value)]
        return values + [(n, v) for n in ("mean", "std") for v in self._per_channel(n)]

    def _per_channel(self, name: str) -> tuple[float, ...]:
        value = getattr(self, name)
        return tuple(value) if isinstance(value, tuple) else (value,) * self.channels

    def normalization(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float32 [channels, 1, 1], to broadcast over [channels, S, S]."""
        mean, std = (np.float32(self._per_channel(n)).reshape(-1, 1, 1) for n in ("mean", "std"))
        return mean, std

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for name in ("mean", "std"):  # JSON has no tuples
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return data

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
    if cfg.minmax:
        low, high = float(gray.min()), float(gray.max())
        gray = (gray - low) / (high - low) if high > low else np.zeros_like(gray)
    square = _SQUARERS[cfg.resize](gray, cfg)
    mean, std = cfg.normalization()
    channels = np.repeat(square[None], cfg.channels, axis=0)
    return ((channels - mean) / std).astype(np.float32, copy=False)  # writable


def _resized(gray: np.ndarray, height: int, width: int, cfg: PreprocessConfig) -> np.ndarray:
    image = Image.fromarray(gray).resize((width, height), INTERPOLATIONS[cfg.interpolation])
    # Bilinear weights are non-negative and sum to 1, so values stay in [0, 1]; bicubic
    # overshoots at edges. The clip removes both, as an 8-bit image processor's clamp does.
    return np.clip(np.asarray(image), 0.0, 1.0)


def _pad_square(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Long side to image_size, the rest padded (nothing of the radiograph is cut)."""
    size = cfg.image_size
    height, width = gray.shape
    scale = size / max(height, width)
    new_h = min(size, max(1, round(height * scale)))
    new_w = min(size, max(1, round(width * scale)))
    canvas = np.full((size, size), cfg.pad_value, dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = _resized(gray, new_h, new_w, cfg)
    return canvas


def _fill_square(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Short side to image_size (the long side as transformers computes it: truncated), then
    the central square, as CLIPImageProcessor / BitImageProcessor's resize + center_crop."""
    size = cfg.image_size
    height, width = gray.shape
    short, long = min(height, width), max(height, width)
    new_long = max(size, int(size * long / short))
    new_h, new_w = (size, new_long) if height <= width else (new_long, size)
    resized = _resized(gray, new_h, new_w, cfg)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def _stretch_square(gray: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Both sides to image_size, the aspect ratio not kept (Gemma 3's image processor)."""
    return _resized(gray, cfg.image_size, cfg.image_size, cfg)


_SQUARERS = {"pad": _pad_square, "crop": _fill_square, "stretch": _stretch_square}


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
        mean, std = cfg.normalization()
        array = array[0] * std[0, 0, 0] + mean[0, 0, 0]
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
