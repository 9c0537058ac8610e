"""preprocess: aspect ratio, centered padding, exact normalization, channels, config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cxrlite.imaging.decode import load_image
from cxrlite.imaging.preprocess import (
    PreprocessConfig,
    preprocess,
    preprocess_batch,
    to_display_png,
)
from cxrlite.imaging.write import dicom_bytes

PLAIN = dict(mean=0.0, std=1.0)  # normalization off, to read pixel values directly


def test_wide_image_pads_top_and_bottom():
    cfg = PreprocessConfig(image_size=32, channels=1, pad_value=0.0, mean=0.5, std=0.5)
    out = preprocess(np.ones((20, 40), np.float32), cfg)  # 2:1 -> 16 x 32, 8 rows pad each side
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    assert np.all(out[0, :8] == -1.0) and np.all(out[0, 24:] == -1.0)  # (0 - 0.5) / 0.5
    assert np.all(out[0, 8:24] == 1.0)  # (1 - 0.5) / 0.5


def test_tall_image_pads_left_and_right_with_pad_value():
    cfg = PreprocessConfig(image_size=32, channels=1, pad_value=0.25, **PLAIN)
    out = preprocess(np.ones((40, 10), np.float32), cfg)  # -> 32 x 8, 12 columns each side
    assert np.all(out[0, :, :12] == 0.25) and np.all(out[0, :, 20:] == 0.25)
    assert np.all(out[0, :, 12:20] == 1.0)


def test_aspect_ratio_kept_for_content():
    cfg = PreprocessConfig(image_size=64, channels=1, **PLAIN)
    x = np.zeros((30, 60), np.float32)
    x[:, 30:] = 1.0  # right half white
    out = preprocess(x, cfg)[0]
    rows_with_content = np.flatnonzero(out.max(axis=1) > 0)
    assert (rows_with_content[0], rows_with_content[-1]) == (16, 47)  # 32 rows, centered
    assert out[32, :31].max() < 0.5 < out[32, 33:].min()  # left/right halves stay halves


def test_square_image_at_target_size_is_unchanged():
    cfg = PreprocessConfig(image_size=16, channels=1, **PLAIN)
    x = np.random.default_rng(0).random((16, 16), dtype=np.float32)
    np.testing.assert_allclose(preprocess(x, cfg)[0], x, atol=1e-6)


def test_exact_normalization_values():
    cfg = PreprocessConfig(image_size=16, channels=3, mean=0.25, std=0.5)
    x = np.full((16, 16), 0.75, np.float32)
    x[0, 0] = 0.0
    out = preprocess(x, cfg)
    assert out[:, 8, 8].tolist() == [1.0, 1.0, 1.0]  # (0.75 - 0.25) / 0.5
    assert out[1, 0, 0] == -0.5  # (0 - 0.25) / 0.5
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[1], out[2])


def test_downscaling_is_antialiased():
    """The documented filter averages over the covered area: a one-pixel checkerboard
    shrunk 4x is mid-gray, not an aliased pattern of 0s and 1s."""
    board = (np.indices((64, 64)).sum(axis=0) % 2).astype(np.float32)
    out = preprocess(board, PreprocessConfig(image_size=16, channels=1, **PLAIN))
    assert np.abs(out - 0.5).max() < 0.01


def test_upscaling_and_batch():
    cfg = PreprocessConfig(image_size=16)
    images = [np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), np.eye(20, dtype=np.float32)]
    batch = preprocess_batch(images, cfg)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], preprocess(images[1], cfg))
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert preprocess_batch([], cfg).shape == (0, 3, 16, 16)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((4, 4, 3), np.float32),
        np.zeros((0, 4), np.float32),
        np.zeros((4, 4), np.uint8),
        np.full((4, 4), 1.5, np.float32),
        np.full((4, 4), np.nan, np.float32),
    ],
)
def test_bad_pixels_rejected(bad):
    with pytest.raises(ValueError):
        preprocess(bad, PreprocessConfig(image_size=16))


def test_config_round_trip_through_json():
    cfg = PreprocessConfig(image_size=384, channels=1, mean=0.48, std=0.27, pad_value=0.1)
    restored = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert PreprocessConfig.from_dict({}) == PreprocessConfig()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"image_size": 0}, "image_size"),
        ({"image_size": 224.0}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"channels": 2}, "channels"),
        ({"std": 0.0}, "std"),
        ({"mean": float("nan")}, "mean"),
        ({"mean": "0.5"}, "mean"),
        ({"pad_value": 1.5}, "pad_value"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="imagesize"):
        PreprocessConfig.from_dict({"imagesize": 224})


def test_display_png_shows_what_the_model_sees(tmp_path):
    cfg = PreprocessConfig(image_size=16, mean=0.5, std=0.25)
    x = np.linspace(0, 1, 16 * 8, dtype=np.float32).reshape(8, 16)
    model_input = preprocess(x, cfg)
    path = to_display_png(model_input, tmp_path / "seen.png", cfg)
    shown = np.asarray(Image.open(path))
    assert shown.dtype == np.uint8 and shown.shape == (16, 16)
    expected = np.rint((model_input[0] * 0.25 + 0.5) * 255)
    np.testing.assert_array_equal(shown, expected.astype(np.uint8))
    assert shown[0].max() == 0  # padding row is pad_value 0 -> black

    raw = np.asarray(Image.open(to_display_png(x, tmp_path / "raw.png")))
    np.testing.assert_array_equal(raw, np.rint(x * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="PreprocessConfig"):
        to_display_png(model_input, tmp_path / "x.png")


def test_decoded_dicom_to_model_input():
    stored = (np.arange(40 * 80, dtype=np.uint32).reshape(40, 80) % 4096).astype(np.uint16)
    image = load_image(dicom_bytes(stored, bits_stored=12, photometric="MONOCHROME1"))
    out = preprocess(image.pixels, PreprocessConfig(image_size=32))
    assert out.shape == (3, 32, 32)
    assert np.all(out[:, :8] == -1.0) and np.all(out[:, 24:] == -1.0)  # 2:1 padding
    assert out[:, 8:24].max() <= 1.0 and out[:, 8:24].min() >= -1.0


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("shape", [(90, 120), (120, 90), (77, 77)])
def test_crop_mode_matches_transformers_clip_image_processor(shape):
    """resize="crop" + bicubic + per-channel mean/std is what CLIPImageProcessor does to an RGB
    image (shortest edge, centre crop): the same pixels but for its 8-bit rounding."""
    from transformers import CLIPImageProcessor

    # A radiograph's smooth densities (noise-free: on pixel noise, Pillow's 8-bit bicubic clamps
    # between its two passes and the float one does not)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    smooth = 0.5 + 0.3 * np.sin(6 * x) * np.cos(4 * y) + 0.15 * np.exp(-((x - 0.4) ** 2) * 20)
    gray8 = np.rint(np.clip(smooth, 0, 1) * 255).astype(np.uint8)
    cfg = PreprocessConfig(
        image_size=64, channels=3, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
        resize="crop", interpolation="bicubic",
    )  # fmt: skip
    ours = preprocess(gray8.astype(np.float32) / 255.0, cfg)
    hf = CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
    )  # fmt: skip
    theirs = hf(images=Image.fromarray(gray8).convert("RGB"), return_tensors="np")["pixel_values"]
    assert theirs.shape == (1, 3, 64, 64) and ours.shape == (3, 64, 64)
    # their 8-bit rounding after each resize pass: about a level, over std ~0.27
    assert np.abs(ours - theirs[0]).max() < 1.5 / 255 / 0.26


def test_minmax_stretches_each_image_and_config_round_trips():
    cfg = PreprocessConfig(image_size=16, channels=1, mean=0.5, std=0.5, minmax=True)
    dim = np.full((16, 16), 0.4, np.float32)
    dim[:8] = 0.6
    out = preprocess(dim, cfg)
    assert out.min() == pytest.approx(-1.0) and out.max() == pytest.approx(1.0)
    rgb = PreprocessConfig(channels=3, mean=[0.1, 0.2, 0.3], std=(1, 2, 3), resize="crop")
    assert PreprocessConfig.from_dict(rgb.to_dict()) == rgb and rgb.to_dict()["mean"] == [
        0.1,
        0.2,
        0.3,
    ]
    with pytest.raises(ValueError, match="2 values for 3 channels"):
        PreprocessConfig(channels=3, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="resize must be one of"):
        PreprocessConfig(resize="squash")


def test_stretch_resizes_both_sides_without_keeping_the_aspect():
    """Gemma 3's processor: the whole image, both sides to the square, as PIL resizes it."""
    rng = np.random.default_rng(3)
    wide = rng.random((40, 100)).astype(np.float32)
    cfg = PreprocessConfig(image_size=32, channels=1, mean=0.5, std=0.5, resize="stretch")
    out = preprocess(wide, cfg)
    expected = np.asarray(Image.fromarray(wide).resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(out[0], (np.clip(expected, 0, 1) - 0.5) / 0.5, atol=1e-6)
    assert out.shape == (1, 32, 32)
