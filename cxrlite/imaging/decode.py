"""Read a radiograph (DICOM, PNG or JPEG) into display-ready gray pixels in [0, 1].

The format is found from the content, never the file name. DICOM follows the standard's
grayscale pipeline: stored values -> Modality LUT (rescale slope/intercept) -> VOI LUT or
window center/width (or min-max when the file has neither) -> MONOCHROME1 inversion, so bright
always means dense. PNG and JPEG are scaled by their bit depth. Color becomes luminance.

Bad input raises a typed `ImageError` (cxrlite.imaging.errors). Dimensions are checked from the
header before any pixel is decoded, so a file claiming 100000 x 100000 pixels fails at once.
Nothing here logs or returns patient identifiers: only technical header fields are read.
"""

from __future__ import annotations

import io
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataelem import RawDataElement
from pydicom.errors import InvalidDicomError
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_windowing,
    get_decoder,
    pixel_array,
)
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from cxrlite.imaging.errors import (
    DegenerateImageError,
    ImageError,
    ImageTooLargeError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedImageError,
    UnsupportedTransferSyntaxError,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000  # ~7000 px a side; large flat-panel detectors are ~4300
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as Pillow's convert("L")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
# Little and big endian encodings of the (7FE0,0010) Pixel Data tag.
PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")
OTHER_SIGNATURES = {
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"%PDF": "PDF",
    b"\x00\x00\x00\x0cjP": "JPEG 2000 (JP2)",
    b"PK\x03\x04": "ZIP archive",
}
# Syntaxes newer than pydicom 3.0's UID dictionary, named so the error can say what they are.
EXTRA_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
}


@dataclass
class WindowInfo:
    """How stored values became [0, 1]: source is voi_lut, window_tags, min_max or bit_depth."""

    source: str
    center: float | None = None
    width: float | None = None


@dataclass
class ImageInfo:
    """What was read; technical fields only, never patient identifiers."""

    format: str  # "dicom", "png" or "jpeg"
    rows: int
    columns: int
    photometric_interpretation: str
    bits_stored: int
    frames: int = 1
    modality: str | None = None
    view_position: str | None = None
    transfer_syntax: str | None = None
    transfer_syntax_uid: str | None = None
    window: WindowInfo | None = None
    rescale: tuple[float, float] | None = None  # (slope, intercept)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rescale"] = list(self.rescale) if self.rescale is not None else None
        return d


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32 HxW in [0, 1], bright = dense
    info: ImageInfo


def load_image(
    source: str | Path | bytes,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
    """Decode a DICOM/PNG/JPEG file path or bytes; `name` labels bytes in error messages."""
    data, label = _read_source(source, name)
    kind = sniff_format(data)
    if kind == "dicom":
        image = _decode_dicom(data, label, max_pixels, force=not _has_dicm_prefix(data))
    elif kind in ("png", "jpeg"):
        image = _decode_pil(data, label, kind, max_pixels)
    else:
        raise NotAnImageError(label, _not_an_image_reason(data))
    info = image.info
    window_source = info.window.source if info.window else "-"
    logger.debug("decoded %s %dx%d, window %s", info.format, info.rows, info.columns, window_source)
    return image


def inspect_image(
    source: str | Path | bytes | DecodedImage,
    *,
    name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, Any]:
    """What `load_image` read and applied, as a dict; no patient identifiers, no pixels."""
    image = (
        source
        if isinstance(source, DecodedImage)
        else load_image(source, name=name, max_pixels=max_pixels)
    )
    report = image.info.to_dict()
    report["output_shape"] = list(image.pixels.shape)
    return report


def sniff_format(data: bytes) -> str | None:
    """'dicom', 'png', 'jpeg' from the leading bytes, or None."""
    if _has_dicm_prefix(data):
        return "dicom"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    # DICOM without the 128-byte preamble starts with a group 0002 (file meta) or 0008 tag,
    # little or big endian; only then is parsing tried, so random bytes rarely reach pydicom.
    if len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return "dicom"
    return None


def _has_dicm_prefix(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _read_source(source: str | Path | bytes, name: str | None) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray | memoryview):
        data, label = bytes(source), name or "upload"
    else:
        path = Path(source)
        data, label = path.read_bytes(), name or str(path)
    if not data:
        raise NotAnImageError(label, "the file is empty")
    return data, label


def _not_an_image_reason(data: bytes) -> str:
    for signature, kind in OTHER_SIGNATURES.items():
        if data.startswith(signature):
            return f"a {kind} file is not accepted; send DICOM, PNG or JPEG"
    return "not a DICOM, PNG or JPEG image (unrecognized content)"


def _check_pixel_count(label: str, rows: int, columns: int, max_pixels: int) -> None:
    if rows <= 0 or columns <= 0:
        raise ImageTooLargeError(label, f"the image has zero size ({rows} x {columns} pixels)")
    if rows * columns > max_pixels:
        raise ImageTooLargeError(
            label,
            f"{rows} x {columns} = {rows * columns} pixels exceeds the limit of {max_pixels}",
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0].rstrip(":") if text else type(error).__name__


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ LUMA_WEIGHTS


def _check_not_degenerate(label: str, gray: np.ndarray) -> np.ndarray:
    if not np.isfinite(gray).all():
        raise DegenerateImageError(label, "pixel values contain NaN or infinity")
    if gray.max() == gray.min():
        raise DegenerateImageError(label, "the image is constant (every pixel has one value)")
    return gray


# ---------------------------------------------------------------------------- PNG / JPEG


def _decode_pil(data: bytes, label: str, kind: str, max_pixels: int) -> DecodedImage:
    fmt = kind.upper()
    if kind == "png":
        # IHDR is the first chunk at a fixed offset; reading it here catches zero sizes,
        # which Pillow reports only as "cannot identify image file".
        if len(data) < 33:
            raise TruncatedImageError(label, "PNG ends inside its header")
        width = int.from_bytes(data[16:20], "big")
        height = int.from_bytes(data[20:24], "big")
        _check_pixel_count(label, height, width, max_pixels)
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
        _check_pixel_count(label, im.height, im.width, max_pixels)
        im.load()
        if kind == "jpeg":
            im = ImageOps.exif_transpose(im)  # phone photos of films carry a rotation tag
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(label, f"{fmt} dimensions refused by Pillow: {e}") from None
    except UnidentifiedImageError:
        if kind == "jpeg" and b"\xff\xda" not in data:  # no start-of-scan marker
            raise TruncatedImageError(label, "JPEG ends before its image data") from None
        raise NotAnImageError(label, f"{fmt} signature but its header cannot be parsed") from None
    except Exception as e:  # Pillow reports corrupt data with assorted exception types
        if isinstance(e, EOFError) or "truncated" in str(e).lower():
            raise TruncatedImageError(label, f"{fmt} image data ends early ({e})") from None
        raise NotAnImageError(label, f"corrupt {fmt} image data ({_first_line(e)})") from None

    warnings: list[str] = []
    mode = im.mode
    if mode in ("I;16", "I;16L", "I;16B", "I"):
        bits, photometric = 16, "MONOCHROME2"
        gray = np.asarray(im, dtype=np.float64)
        if gray.max() < 4096:
            warnings.append("16-bit image uses at most 12 bits; scaled by 65535 it is dark")
    elif mode in ("L", "LA", "1"):
        bits, photometric = 8, "MONOCHROME2"
        gray = np.asarray(im.convert("L"), dtype=np.float64)
    elif mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        bits, photometric = 8, "RGB" if mode != "P" else "PALETTE COLOR"
        gray = _luminance(np.asarray(im.convert("RGB")))
        warnings.append(f"color {fmt} ({mode}) converted to gray by luminance")
    else:
        raise NotAnImageError(label, f"{fmt} pixel mode {mode} is not supported")
    max_value = 2**bits - 1
    gray = _check_not_degenerate(label, gray) / max_value
    info = ImageInfo(
        format=kind,
        rows=gray.shape[0],
        columns=gray.shape[1],
        photometric_interpretation=photometric,
        bits_stored=bits,
        window=WindowInfo("bit_depth", center=max_value / 2, width=float(max_value)),
        warnings=warnings,
    )
    return DecodedImage(np.clip(gray, 0.0, 1.0).astype(np.float32), info)


# ---------------------------------------------------------------------------------- DICOM


def _decode_dicom(data: bytes, label: str, max_pixels: int, force: bool) -> DecodedImage:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except (InvalidDicomError, EOFError) as e:
        if force:
            raise NotAnImageError(label, "not a DICOM, PNG or JPEG image") from None
        raise TruncatedImageError(label, f"DICOM header ends early ({e})") from None
    except Exception as e:  # pydicom raises assorted errors on garbage; none is a crash
        raise NotAnImageError(label, f"DICOM header cannot be parsed ({type(e).__name__})") from e

    try:
        _check_dicom_complete(ds, data, label, force)
        syntax = _transfer_syntax(ds, label)
        info = _dicom_info(ds, syntax)
    except ImageError:
        raise
    except Exception as e:  # values convert lazily, so a malformed header fails here, variously
        reason = _first_line(e)
        raise NotAnImageError(label, f"DICOM header has an invalid value ({reason})") from None
    _check_pixel_count(label, info.rows, info.columns, max_pixels)
    is_float = "PixelData" not in ds
    if info.frames > 1:
        info.warnings.append(f"multi-frame DICOM ({info.frames} frames): only the first is used")

    try:
        stored = pixel_array(ds, index=0)
    except Exception as e:  # codecs fail on corrupt data in many ways; all mean bad input
        if "less than expected" in str(e):
            raise TruncatedImageError(label, "DICOM pixel data is shorter than declared") from None
        reason = _first_line(e)
        raise NotAnImageError(label, f"DICOM pixel data cannot be decoded ({reason})") from None
    except BaseException as e:
        # pylibjpeg-rle is Rust: corrupt input can raise pyo3's PanicException, which is a
        # BaseException and so escapes pydicom's per-plugin error handling.
        if type(e).__name__ != "PanicException":
            raise
        raise NotAnImageError(label, "DICOM pixel data cannot be decoded (codec panic)") from None

    try:
        gray = _dicom_to_gray(ds, stored, label, info, is_float)
    except ImageError:
        raise
    except Exception as e:  # malformed LUTs or pixel module values surface only here
        reason = _first_line(e)
        raise NotAnImageError(label, f"DICOM pixel values cannot be mapped ({reason})") from None
    return DecodedImage(np.clip(gray, 0.0, 1.0).astype(np.float32), info)


def _dicom_to_gray(
    ds: pydicom.Dataset, stored: np.ndarray, label: str, info: ImageInfo, is_float: bool
) -> np.ndarray:
    photometric = info.photometric_interpretation
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        gray = _dicom_grayscale(ds, stored, label, info, is_float)
        if photometric == "MONOCHROME1":
            gray = 1.0 - gray  # MONOCHROME1 stores dense as dark
    elif photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        gray = _check_not_degenerate(label, _luminance(rgb)) / np.iinfo(rgb.dtype).max
        info.window = WindowInfo("bit_depth")
    elif stored.ndim == 3 and stored.shape[-1] == 3:  # RGB, or YBR already converted to RGB
        max_value = 2**info.bits_stored - 1
        gray = _check_not_degenerate(label, _luminance(stored)) / max_value
        info.window = WindowInfo("bit_depth", center=max_value / 2, width=float(max_value))
        info.warnings.append(f"color DICOM ({photometric}) converted to gray by luminance")
    else:
        raise NotAnImageError(label, f"photometric interpretation {photometric} is not supported")
    return gray


def _dicom_info(ds: pydicom.Dataset, syntax: UID) -> ImageInfo:
    return ImageInfo(
        format="dicom",
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        photometric_interpretation=str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        .strip()
        .upper(),
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 0)) or 0),
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        modality=str(ds.get("Modality", "")) or None,
        view_position=str(ds.get("ViewPosition", "")) or None,
        transfer_syntax=_syntax_name(syntax),
        transfer_syntax_uid=str(syntax),
    )


def _check_dicom_complete(ds: pydicom.Dataset, data: bytes, label: str, forced: bool) -> None:
    """Tell a truncated file from one that has no image, before touching pixels.

    pydicom reads a cut-off file without raising: a defined-length value comes back short,
    and cut-off encapsulated pixel data is dropped with a warning. Both are checked here.
    """
    if forced and not any(t in ds for t in ("SOPClassUID", "Rows", "Modality")):
        # Bytes that merely start like a DICOM tag: parsing them yields no DICOM content.
        raise NotAnImageError(label, "not a DICOM, PNG or JPEG image (unrecognized content)")
    if len(ds) == 0:
        raise TruncatedImageError(label, "DICOM data set ends early: none of it could be read")
    last = ds.get_item(max(ds.keys()))
    if (
        isinstance(last, RawDataElement)
        and last.length != 0xFFFFFFFF
        and last.value is not None
        and len(last.value) < last.length
    ):
        raise TruncatedImageError(
            label,
            f"DICOM ends inside element {last.tag} ({len(last.value)} of {last.length} bytes)",
        )
    if not any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "Rows" in ds and any(t in data for t in PIXEL_DATA_TAGS):
            raise TruncatedImageError(label, "DICOM pixel data is cut off before its end")
        raise NoPixelDataError(label, "DICOM object has no pixel data (not an image)")
    if "Rows" not in ds or "Columns" not in ds:
        raise NotAnImageError(label, "DICOM pixel data without Rows/Columns: header incomplete")


def _transfer_syntax(ds: pydicom.Dataset, label: str) -> UID:
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if not syntax:
        # A file without file meta: pydicom worked out the encoding while parsing.
        implicit, little = ds.original_encoding
        syntax = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little
            else ExplicitVRBigEndian
        )
        ds.file_meta.TransferSyntaxUID = syntax
    syntax = UID(str(syntax))
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise UnsupportedTransferSyntaxError(
            label, str(syntax), _syntax_name(syntax), _needed_plugin(syntax)
        ) from None
    if not decoder.is_available:
        needs = "install one of: " + "; ".join(decoder.missing_dependencies)
        raise UnsupportedTransferSyntaxError(label, str(syntax), _syntax_name(syntax), needs)
    return syntax


def _syntax_name(syntax: UID) -> str:
    name = EXTRA_SYNTAX_NAMES.get(str(syntax)) or syntax.name
    return name if name != str(syntax) else "unknown transfer syntax"


def _needed_plugin(syntax: UID) -> str:
    if str(syntax).startswith("1.2.840.10008.1.2.4.11"):
        return (
            f"pydicom {pydicom.__version__} has no JPEG XL decoder plugin; convert the file "
            "to an uncompressed or JPEG 2000 transfer syntax first"
        )
    if syntax.name.startswith(("MPEG", "HEVC", "SMPTE", "JPIP")) or "Referenced" in syntax.name:
        return "video or referenced pixel data has no pydicom decoder; export a single image"
    return (
        f"pydicom {pydicom.__version__} has no decoder plugin for it; convert the file to "
        "an uncompressed or JPEG 2000 transfer syntax first"
    )


def _dicom_grayscale(
    ds: pydicom.Dataset, stored: np.ndarray, label: str, info: ImageInfo, is_float: bool
) -> np.ndarray:
    """Modality LUT then VOI (LUT sequence, window tags or min-max) -> [0, 1]."""
    if "ModalityLUTSequence" in ds:
        info.warnings.append("Modality LUT Sequence applied")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        info.rescale = (float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0)))
    values = _check_not_degenerate(
        label, np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    )

    gray = None
    voi_items = ds.get("VOILUTSequence") or []
    if voi_items and not is_float:
        gray = _apply_voi_lut_sequence(ds, values, info)
    elif "WindowCenter" in ds and "WindowWidth" in ds and not is_float:
        gray = _apply_window_tags(ds, values, info)
    if gray is not None and gray.max() == gray.min():
        info.warnings.append(
            f"the {info.window.source} window maps the whole image to one value; min-max used"
        )
        gray = None
    if gray is None:
        low, high = float(values.min()), float(values.max())
        info.window = WindowInfo("min_max", center=(low + high) / 2, width=high - low)
        gray = (values - low) / (high - low)
    return gray


def _apply_voi_lut_sequence(ds: pydicom.Dataset, values: np.ndarray, info: ImageInfo) -> np.ndarray:
    """Look stored values up in the first VOI LUT, scaled by its declared entry depth.

    Hand-written rather than pydicom's apply_voi_lut: pydicom 3.0.2 builds the LUT index in
    the LUT entry dtype, so an 8-bit LUT with more than 256 entries wraps its index.
    """
    items = ds.VOILUTSequence
    if len(items) > 1:
        info.warnings.append(f"{len(items)} VOI LUTs in the file: the first is used")
    item = items[0]
    n_entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 65536  # PS3.3 C.11.1.1: 0 means 2**16 entries
    if int(ds.get("PixelRepresentation", 0)) == 1 and first_mapped >= 2**15:
        first_mapped -= 2**16  # a signed first-mapped value read back as US
    if item["LUTData"].VR == "OW":
        little = ds.original_encoding[1] is not False
        table = np.frombuffer(item.LUTData, dtype="<u2" if little else ">u2")[:n_entries]
    else:
        table = np.atleast_1d(np.asarray(item.LUTData, dtype=np.int64))[:n_entries]
    index = np.clip(np.rint(values).astype(np.int64) - first_mapped, 0, len(table) - 1)
    full_scale = 2**bits - 1
    if table.max() < full_scale / 2:
        info.warnings.append(f"VOI LUT entries use under half of its declared {bits} bits")
    info.window = WindowInfo("voi_lut")
    return table[index].astype(np.float64) / full_scale


def _apply_window_tags(
    ds: pydicom.Dataset, values: np.ndarray, info: ImageInfo
) -> np.ndarray | None:
    centers, widths = ds["WindowCenter"], ds["WindowWidth"]
    if centers.VM > 1 or widths.VM > 1:
        info.warnings.append(f"{centers.VM} windows in the file: the first is used")
    center = float(centers.value[0] if centers.VM > 1 else centers.value)
    width = float(widths.value[0] if widths.VM > 1 else widths.value)
    try:
        windowed = apply_windowing(values, ds, index=0)
        # pydicom scales the output to the stored value range (after rescale); passing it
        # the two extremes reads that range back instead of re-deriving its rules here.
        with np.errstate(over="ignore"):
            low, high = apply_windowing(np.array([-1e300, 1e300]), ds, index=0)
    except ValueError as e:  # e.g. a width below 1 for a LINEAR window
        info.warnings.append(f"window tags ignored ({e})")
        return None
    info.window = WindowInfo("window_tags", center=center, width=width)
    return (windowed - low) / (high - low)
