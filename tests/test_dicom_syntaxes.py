"""Every transfer syntax we write is decoded back to the exact (or near) expected pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from cxrlite.imaging.decode import load_image
from cxrlite.imaging.errors import UnsupportedTransferSyntaxError
from cxrlite.imaging.write import dicom_bytes

# JPEG-LS files are written with pyjpegls (pydicom's JPEG-LS encoder, a dev dependency).
LOSSLESS = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    JPEGLSLossless,
]


def gradient12() -> np.ndarray:
    """48 x 64, values 0..4095 spread over the image, no two rows alike."""
    return (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 4095 // (48 * 64 - 1)).astype(
        np.uint16
    )


def minmax(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return ((values - values.min()) / (values.max() - values.min())).astype(np.float32)


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_syntaxes_decode_exactly(syntax):
    g = gradient12()
    image = load_image(dicom_bytes(g, bits_stored=12, transfer_syntax=syntax))
    assert image.info.transfer_syntax_uid == syntax
    assert image.info.window.source == "min_max"
    np.testing.assert_array_equal(image.pixels, minmax(g))
    assert image.pixels[0, 0] == 0.0 and image.pixels[-1, -1] == 1.0


@pytest.mark.parametrize("syntax", LOSSLESS)
def test_lossless_syntaxes_signed_with_rescale_and_window(syntax):
    stored = gradient12().astype(np.int16) - 2048  # -2048..2047
    kw = dict(bits_stored=12, signed=True, rescale=(2.0, -100.0), window=(0.0, 4000.0))
    native = load_image(dicom_bytes(stored, **kw))
    image = load_image(dicom_bytes(stored, transfer_syntax=syntax, **kw))
    np.testing.assert_array_equal(image.pixels, native.pixels)
    assert image.info.rescale == (2.0, -100.0)
    assert image.info.window.source == "window_tags"
    # DICOM linear window (PS3.3 C.11.2.1.2.1) on the rescaled values, computed here.
    values = stored.astype(np.float64) * 2.0 - 100.0
    expected = np.clip((values - (0.0 - 0.5)) / (4000.0 - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_rgb_becomes_luminance(syntax):
    g8 = (gradient12() // 16).astype(np.uint8)
    rgb = np.stack([g8, 255 - g8, g8 // 2], axis=-1)
    image = load_image(dicom_bytes(rgb, photometric="RGB", transfer_syntax=syntax))
    expected = (0.299 * g8 + 0.587 * (255.0 - g8) + 0.114 * (g8 // 2)) / 255.0
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert image.info.photometric_interpretation == "RGB"
    assert any("luminance" in w for w in image.info.warnings)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_multi_frame_uses_first_frame_with_warning(syntax):
    g = gradient12()
    frames = np.stack([g, 4095 - g, g // 2])
    image = load_image(dicom_bytes(frames, bits_stored=12, transfer_syntax=syntax))
    np.testing.assert_array_equal(image.pixels, minmax(g))
    assert image.info.frames == 3
    assert any("3 frames" in w and "first" in w for w in image.info.warnings)


def test_jpeg_baseline_8bit_is_close():
    g8 = (gradient12() // 16).astype(np.uint8)
    image = load_image(dicom_bytes(g8, transfer_syntax=JPEGBaseline8Bit, jpeg_quality=95))
    assert image.info.transfer_syntax == "JPEG Baseline (Process 1)"
    assert np.abs(image.pixels - minmax(g8)).max() < 4 / 255


def test_jpeg_baseline_rgb_is_close():
    g8 = (gradient12() // 16).astype(np.uint8)
    rgb = np.stack([g8, g8, g8], axis=-1)
    image = load_image(dicom_bytes(rgb, photometric="RGB", transfer_syntax=JPEGBaseline8Bit))
    assert image.info.photometric_interpretation == "YBR_FULL_422"
    assert np.abs(image.pixels - g8 / 255.0).max() < 4 / 255


def test_jpeg_ls_near_lossless_error_is_bounded():
    g = gradient12()
    ds = pydicom.dcmread(
        io.BytesIO(dicom_bytes(g, bits_stored=12, transfer_syntax=JPEGLSNearLossless))
    )
    assert np.abs(ds.pixel_array.astype(int) - g).max() <= 2  # the NEAR value we encode with
    image = load_image(dicom_bytes(g, bits_stored=12, transfer_syntax=JPEGLSNearLossless))
    assert np.abs(image.pixels - minmax(g)).max() < 5 / 4095


def test_jpeg2000_lossy_is_close():
    g = gradient12()
    image = load_image(dicom_bytes(g, bits_stored=12, transfer_syntax=JPEG2000))
    assert np.abs(image.pixels - minmax(g)).mean() < 0.01


def test_jpeg_extended_12bit_from_pydicom_test_file():
    """No 12-bit JPEG encoder installs here, so this uses pydicom's own JPEG Extended file;
    the stored values asserted are those of pydicom's pixel reference for it."""
    path = Path(pydicom.__file__).parent / "data" / "test_files" / "JPGExtended.dcm"
    image = load_image(path)  # a missing file (a broken pydicom install) fails here
    assert image.info.transfer_syntax_uid == JPEGExtended12Bit
    assert image.info.bits_stored == 12 and (image.info.rows, image.info.columns) == (1024, 256)
    assert image.info.window.source == "min_max" and image.info.window.width == 264.0
    assert image.pixels[420, 140] == pytest.approx(244 / 264)
    assert image.pixels[230, 120] == pytest.approx(95 / 264)


def test_jpeg_extended_12bit_write_refused_with_reason():
    with pytest.raises(ValueError, match="no encoder for 12-bit JPEG"):
        dicom_bytes(gradient12(), bits_stored=12, transfer_syntax=JPEGExtended12Bit)


def _with_syntax(uid_bytes: bytes) -> bytes:
    """An RLE file relabelled: MPEG2 (known to pydicom, no decoder) or a byte-patched UID
    of the same length that pydicom 3.0 does not know at all (JPEG XL)."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(gradient12(), transfer_syntax=RLELossless)))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue().replace(b"1.2.840.10008.1.2.4.100\0", uid_bytes)


@pytest.mark.parametrize(
    "uid, name",
    [
        ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
        ("1.2.840.10008.1.2.4.110", "JPEG XL Lossless"),
    ],
)
def test_syntax_without_decoder_is_unsupported(uid, name):
    data = _with_syntax(uid.encode() + b"\0")
    with pytest.raises(UnsupportedTransferSyntaxError) as err:
        load_image(data, name="scan.dcm")
    assert err.value.code == "unsupported_transfer_syntax"
    assert err.value.uid == uid and err.value.syntax_name == name
    message = str(err.value)
    assert message.startswith("scan.dcm: ") and uid in message and name in message
    assert "decoder" in err.value.needs
