"""load_image / inspect_image: the DICOM grayscale pipeline, PNG/JPEG, and every bad input."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.uid import RLELossless

from cxrlite.imaging import decode
from cxrlite.imaging.decode import inspect_image, load_image, sniff_format
from cxrlite.imaging.errors import (
    DegenerateImageError,
    ImageError,
    ImageTooLargeError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedImageError,
)
from cxrlite.imaging.write import VoiLut, dicom_bytes, write_dicom


def ramp(bits: int, shape=(32, 40)) -> np.ndarray:
    """Values 0 .. 2**bits - 1 over the image (min and max both present)."""
    n = shape[0] * shape[1]
    dtype = np.uint8 if bits <= 8 else np.uint16
    values = np.arange(n, dtype=np.int64) * (2**bits - 1) // (n - 1)
    return values.reshape(shape).astype(dtype)


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 'LINEAR' window to [0, 1], written out independently of pydicom."""
    x = x.astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def encode(array: np.ndarray, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **kw)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG header claiming width x height, with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def rewrite(data: bytes, **changes) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds)
    return buffer.getvalue()


# ------------------------------------------------------------------- DICOM pipeline


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bit_depths_min_max(bits):
    stored = ramp(bits)
    image = load_image(dicom_bytes(stored, bits_stored=bits))
    assert image.pixels.dtype == np.float32 and image.pixels.shape == (32, 40)
    assert image.info.bits_stored == bits and image.info.window.source == "min_max"
    np.testing.assert_allclose(image.pixels, stored / (2**bits - 1), atol=1e-6)


def test_window_tags_applied_with_dicom_formula():
    stored = ramp(12)
    image = load_image(dicom_bytes(stored, bits_stored=12, window=(1000, 800)))
    assert image.info.window.source == "window_tags"
    assert (image.info.window.center, image.info.window.width) == (1000.0, 800.0)
    np.testing.assert_allclose(image.pixels, linear_window(stored, 1000, 800), atol=1e-6)
    assert image.pixels[stored < 600].max() == 0.0 and image.pixels[stored > 1400].min() == 1.0


def test_multi_valued_window_uses_first_with_note():
    stored = ramp(12)
    image = load_image(dicom_bytes(stored, bits_stored=12, window=[(1000, 800), (3000, 100)]))
    np.testing.assert_allclose(image.pixels, linear_window(stored, 1000, 800), atol=1e-6)
    assert any("2 windows" in w and "first" in w for w in image.info.warnings)


def test_window_outside_data_falls_back_to_min_max():
    stored = ramp(12)
    image = load_image(dicom_bytes(stored, bits_stored=12, window=(60000, 10)))
    assert image.info.window.source == "min_max"
    assert any("one value" in w for w in image.info.warnings)
    np.testing.assert_allclose(image.pixels, stored / 4095, atol=1e-6)


def test_voi_lut_8bit_with_4096_entries():
    stored = ramp(12)
    table = (np.arange(4096) // 16).astype(np.uint16)  # 0..255: an 8-bit LUT, 4096 entries
    image = load_image(dicom_bytes(stored, bits_stored=12, voi_lut=VoiLut(0, table, 8)))
    assert image.info.window.source == "voi_lut"
    np.testing.assert_allclose(image.pixels, table[stored] / 255.0, atol=1e-6)


def test_voi_lut_preferred_over_window_and_signed_first_mapped():
    stored = ramp(12).astype(np.int16) - 2048
    table = np.clip(np.arange(2048) * 2, 0, 4095).astype(np.uint16)  # covers -1024..1023
    lut = VoiLut(-1024, table, 12)
    image = load_image(
        dicom_bytes(stored, bits_stored=12, signed=True, voi_lut=lut, window=(0, 10))
    )
    assert image.info.window.source == "voi_lut"
    index = np.clip(stored.astype(np.int64) + 1024, 0, 2047)
    np.testing.assert_allclose(image.pixels, table[index] / 4095.0, atol=1e-6)
    assert image.pixels[stored < -1024].max() == 0.0


def test_rescale_slope_intercept_negative_slope_inverts_min_max():
    stored = ramp(12)
    image = load_image(dicom_bytes(stored, bits_stored=12, rescale=(-1.0, 4095.0)))
    assert image.info.rescale == (-1.0, 4095.0)
    np.testing.assert_allclose(image.pixels, 1.0 - stored / 4095, atol=1e-6)


def test_monochrome1_is_inverted():
    stored = ramp(12)
    mono2 = load_image(dicom_bytes(stored, bits_stored=12, window=(1500, 2000)))
    mono1 = load_image(
        dicom_bytes(stored, bits_stored=12, window=(1500, 2000), photometric="MONOCHROME1")
    )
    assert mono1.info.photometric_interpretation == "MONOCHROME1"
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    assert mono1.pixels[0, 0] == 1.0  # stored 0 is white (dense) in MONOCHROME1


def test_dicom_without_preamble_and_without_file_meta():
    stored = ramp(12)
    data = dicom_bytes(stored, bits_stored=12)
    expected = stored / 4095
    np.testing.assert_allclose(load_image(data[132:]).pixels, expected, atol=1e-6)  # no preamble

    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.file_meta
    ds.preamble = None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    bare = buffer.getvalue()
    assert bare[:2] == b"\x08\x00"  # starts straight with the data set
    image = load_image(bare)
    assert image.info.transfer_syntax == "Implicit VR Little Endian"
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)


def test_format_detected_by_content_not_extension(tmp_path):
    png_named_dcm = tmp_path / "image.dcm"
    png_named_dcm.write_bytes(encode(ramp(8), "PNG"))
    dicom_named_png = write_dicom(tmp_path / "scan.png", ramp(12), bits_stored=12)
    assert load_image(png_named_dcm).info.format == "png"
    assert load_image(dicom_named_png).info.format == "dicom"
    assert sniff_format(b"plain text") is None


def test_inspect_reports_what_was_read_and_no_identifiers(caplog):
    data = dicom_bytes(
        ramp(12), bits_stored=12, window=(1000, 800), patient_sex="F", patient_age=61, view="AP"
    )
    with caplog.at_level(logging.DEBUG):
        report = inspect_image(data)
    assert report["format"] == "dicom" and report["modality"] == "DX"
    assert report["view_position"] == "AP"
    assert report["photometric_interpretation"] == "MONOCHROME2" and report["bits_stored"] == 12
    assert (report["rows"], report["columns"], report["frames"]) == (32, 40, 1)
    assert report["transfer_syntax"] == "Explicit VR Little Endian"
    assert report["window"] == {"source": "window_tags", "center": 1000.0, "width": 800.0}
    text = json.dumps(report) + caplog.text
    for identifier in ("ANON", "PHANTOM", "19000101", "20000101", "061Y", "REFERRER"):
        assert identifier not in text


# ------------------------------------------------------------------------ PNG / JPEG


def test_png_8_and_16_bit_scaled_by_bit_depth():
    low = load_image(encode(ramp(8), "PNG"))
    high = load_image(encode(ramp(16), "PNG"))
    assert (low.info.bits_stored, high.info.bits_stored) == (8, 16)
    np.testing.assert_allclose(low.pixels, ramp(8) / 255.0, atol=1e-6)
    np.testing.assert_allclose(high.pixels, ramp(16) / 65535.0, atol=1e-6)
    dark = load_image(encode(ramp(12), "PNG"))  # 12-bit values in a 16-bit PNG
    assert any("12 bits" in w for w in dark.info.warnings)


def test_jpeg_gray_close_to_source():
    image = load_image(encode(ramp(8), "JPEG", quality=95))
    assert image.info.format == "jpeg"
    assert np.abs(image.pixels - ramp(8) / 255.0).max() < 4 / 255


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_color_png_jpeg_become_luminance(fmt):
    g = ramp(8)
    rgb = np.stack([g, 255 - g, g // 2], axis=-1)
    image = load_image(encode(rgb, fmt, quality=95) if fmt == "JPEG" else encode(rgb, fmt))
    expected = (0.299 * g + 0.587 * (255.0 - g) + 0.114 * (g // 2)) / 255.0
    tolerance = 1e-6 if fmt == "PNG" else 6 / 255
    assert np.abs(image.pixels - expected).max() <= tolerance
    assert image.info.photometric_interpretation == "RGB"


# ------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "data, problem",
    [
        (os.urandom(3000), "unrecognized"),
        (b"Patient report: no acute findings.\n" * 40, "unrecognized"),
        (b"\x08\x00\x10\x00" + bytes(range(256)) * 8, "unrecognized"),  # looks like a tag only
        (b"", "empty"),
        (encode(ramp(8), "TIFF"), "TIFF"),
    ],
)
def test_not_an_image(data, problem):
    with pytest.raises(NotAnImageError, match=problem) as err:
        load_image(data)
    assert err.value.code == "not_an_image" and isinstance(err.value, ValueError)
    assert str(err.value).startswith("upload: ")


def test_error_names_the_file_path(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(NotAnImageError) as err:
        load_image(path)
    assert str(path) in str(err.value) and err.value.source == str(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_png_jpeg(fmt):
    data = encode(ramp(8, (64, 64)), fmt)
    for cut in (data[: len(data) // 2], data[:20]):
        with pytest.raises(TruncatedImageError) as err:
            load_image(cut, name="chest.img")
        assert err.value.code == "truncated" and "chest.img" in str(err.value)


@pytest.mark.filterwarnings("ignore:End of file reached")  # pydicom's own note on the cut
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", RLELossless])
def test_truncated_dicom(syntax):
    data = dicom_bytes(ramp(12, (64, 64)), bits_stored=12, transfer_syntax=syntax)
    for cut in (data[:-100], data[: len(data) // 2], data[:140]):
        with pytest.raises(TruncatedImageError):
            load_image(cut)


def test_dicom_without_pixel_data():
    data = rewrite(dicom_bytes(ramp(12)), PixelData=None)
    with pytest.raises(NoPixelDataError) as err:
        load_image(data)
    assert err.value.code == "no_pixel_data"


@pytest.fixture
def pixel_decodes(monkeypatch) -> list[str]:
    """Every pixel decode that load_image starts: Pillow's load() and pydicom's pixel_array."""
    calls: list[str] = []
    pillow_load, dicom_pixels = ImageFile.ImageFile.load, decode.pixel_array

    def counted_load(im, *args, **kwargs):
        calls.append("pillow")
        return pillow_load(im, *args, **kwargs)

    def counted_pixels(*args, **kwargs):
        calls.append("pydicom")
        return dicom_pixels(*args, **kwargs)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counted_load)
    monkeypatch.setattr(decode, "pixel_array", counted_pixels)
    return calls


def _refused_before_decoding(calls: list[str], data: bytes, **kw) -> ImageError:
    """load_image(data) raises ImageTooLargeError from the header alone: no pixel decode is
    started and nothing near the claimed size is allocated."""
    tracemalloc.start()
    try:
        with pytest.raises(ImageTooLargeError) as err:
            load_image(data, **kw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert calls == []
    assert peak < 5_000_000
    return err.value


def test_the_decode_spies_see_decoding(pixel_decodes):
    """The spies work: an image that is decoded is recorded by its decoder."""
    for data, decoder in [
        (encode(ramp(8), "PNG"), "pillow"),
        (encode(ramp(8), "JPEG"), "pillow"),
        (dicom_bytes(ramp(12), bits_stored=12), "pydicom"),
    ]:
        pixel_decodes.clear()
        load_image(data)
        assert set(pixel_decodes) == {decoder}


def test_absurd_dimensions_are_refused_before_decoding(pixel_decodes):
    # Header-only PNGs: their few bytes of pixel data could not even be decoded.
    err = _refused_before_decoding(pixel_decodes, png_header_only(100_000, 100_000))
    assert err.code == "image_too_large" and "100000 x 100000" in str(err)
    big = png_header_only(100_000, 100_000)
    err = _refused_before_decoding(pixel_decodes, big, max_pixels=10**11)  # Pillow's guard
    assert "Pillow" in str(err)
    _refused_before_decoding(pixel_decodes, png_header_only(8000, 8000))  # 64 MP > 50 MP default
    # A DICOM header claiming 65535 x 65535 over the pixel data of 32 x 40.
    huge = rewrite(dicom_bytes(ramp(12)), Rows=65535, Columns=65535)
    _refused_before_decoding(pixel_decodes, huge)
    # Valid files over a cap given as a parameter.
    _refused_before_decoding(pixel_decodes, encode(ramp(8), "PNG"), max_pixels=100)
    _refused_before_decoding(pixel_decodes, encode(ramp(8), "JPEG"), max_pixels=100)


def test_zero_size_dicom_and_png(pixel_decodes):
    zero_rows = rewrite(dicom_bytes(ramp(12)), Rows=0)
    assert "zero size" in str(_refused_before_decoding(pixel_decodes, zero_rows))
    assert "zero size" in str(_refused_before_decoding(pixel_decodes, png_header_only(0, 10)))


def test_nan_and_inf_float_dicom():
    for bad in (np.nan, np.inf):
        pixels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
        pixels[3, 3] = bad
        with pytest.raises(DegenerateImageError, match="NaN or infinity") as err:
            load_image(dicom_bytes(pixels))
        assert err.value.code == "degenerate_image"
    good = np.linspace(-1, 3, 64, dtype=np.float32).reshape(8, 8)
    np.testing.assert_allclose(load_image(dicom_bytes(good)).pixels, (good + 1) / 4, atol=1e-6)


def test_constant_images_are_degenerate():
    with pytest.raises(DegenerateImageError, match="constant"):
        load_image(dicom_bytes(np.full((16, 16), 700, np.uint16), window=(700, 400)))
    with pytest.raises(DegenerateImageError, match="constant"):
        load_image(encode(np.full((16, 16), 9, np.uint8), "PNG"))


@pytest.mark.filterwarnings("ignore")
def test_corrupted_inputs_raise_only_image_errors():
    """Random byte flips and cuts of valid files: each either decodes to valid pixels or
    raises an ImageError, never anything else (a crash would be a 500 in the server)."""
    stored = ramp(12, (32, 32))
    seeds = [
        dicom_bytes(stored, bits_stored=12, window=(1000, 500)),
        dicom_bytes(stored, bits_stored=12, transfer_syntax=RLELossless),
        dicom_bytes(stored, bits_stored=12, transfer_syntax="1.2.840.10008.1.2.4.90"),
        dicom_bytes(stored, bits_stored=12, voi_lut=VoiLut(0, np.arange(4096) // 16, 8)),
        encode(ramp(8, (24, 24)), "PNG"),
        encode(ramp(8, (24, 24)), "JPEG"),
    ]
    rng = np.random.default_rng(0)
    outcomes = set()
    for i in range(600):
        data = bytearray(seeds[i % len(seeds)])
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(0, len(data))] = rng.integers(0, 256)
        if rng.random() < 0.3:
            data = data[: rng.integers(0, len(data))]
        try:
            image = load_image(bytes(data))
        except ImageError as err:
            outcomes.add(err.code)
        else:
            assert image.pixels.dtype == np.float32 and np.isfinite(image.pixels).all()
            assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
            outcomes.add("decoded")
    assert {"decoded", "truncated", "not_an_image"} <= outcomes


@pytest.mark.filterwarnings("ignore")
def test_pydicom_bundled_files_decode_or_fail_typed():
    """pydicom's own test files (real vendors' DICOM, odd syntaxes, broken files)."""
    folder = Path(pydicom.__file__).parent / "data" / "test_files"
    files = sorted(folder.glob("*.dcm"))  # part of pydicom's wheel: missing means a broken install
    assert len(files) >= 50, f"pydicom's bundled test files are missing from {folder}"
    codes = {}
    for path in files:
        try:
            image = load_image(path)
            assert image.pixels.ndim == 2 and np.isfinite(image.pixels).all()
            codes[path.name] = "decoded"
        except ImageError as err:
            codes[path.name] = err.code
    assert codes["MR_small_bigendian.dcm"] == "decoded"
    assert codes["examples_palette.dcm"] == "decoded"
    assert codes["SC_ybr_full_422_uncompressed.dcm"] == "decoded"
    assert codes["MR_truncated.dcm"] == "truncated"
    assert codes["rtplan.dcm"] == "no_pixel_data"
    assert codes["badVR.dcm"] == "not_an_image"
    assert sum(code == "decoded" for code in codes.values()) >= 50
