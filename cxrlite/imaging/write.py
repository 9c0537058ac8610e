"""Write PNG and DICOM files from pixel arrays (phantoms, test fixtures, the demo, warm-up).

Each file is a well-formed Part 10 file (preamble, file meta, SOP class and instance UIDs,
image pixel module); it does not carry every Type 1 attribute of the DX IOD (detector and
acquisition modules), as no detector made it. Identifying fields hold synthetic placeholders
only (PatientName "ANON^PHANTOM", fixed placeholder dates and numbers), never patient data.

Compressed transfer syntaxes go through pydicom 3's encoders where one exists (RLE: pydicom
itself; JPEG 2000: pylibjpeg-openjpeg; JPEG-LS: pyjpegls) and through Pillow for JPEG
baseline, which pydicom cannot encode. 12-bit JPEG Extended has no encoder that installs
here (Pillow writes 8-bit JPEG only, pylibjpeg-libjpeg only decodes), so it is refused with
a message saying so.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from cxrlite.fileio import atomic_write_bytes

NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB")


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8- or 16-bit gray (or RGB) array as PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


class VoiLut(NamedTuple):
    """One VOI LUT Sequence item: stored values >= first_mapped index into `table`."""

    first_mapped: int
    table: np.ndarray  # LUT entries, each < 2**bits
    bits: int  # 8 or 10..16, the LUT Descriptor's third value


def dicom_bytes(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    voi_lut: VoiLut | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    modality: str = "DX",
    view: str | None = "PA",
    patient_sex: str | None = None,
    patient_age: int | None = None,
    jpeg_quality: int = 95,
) -> bytes:
    """Encode `pixels` as a DICOM Part 10 file and return its bytes.

    `pixels`: uint8/uint16/int16 HxW or FxHxW (HxWx3 / FxHxWx3 for RGB), or float32 HxW
    written as Float Pixel Data (Parametric Map) so readers can be tested on NaN/inf.
    `window` is one (center, width) pair or a list of pairs (multi-valued window tags).
    """
    arr = np.asarray(pixels)
    transfer_syntax = UID(transfer_syntax)
    if photometric not in PHOTOMETRICS:
        raise ValueError(f"photometric must be one of {PHOTOMETRICS}, got {photometric!r}")
    is_rgb = photometric == "RGB"
    frame_ndim = 3 if is_rgb else 2
    if arr.ndim not in (frame_ndim, frame_ndim + 1) or (is_rgb and arr.shape[-1] != 3):
        layout = "HxWx3 or FxHxWx3" if is_rgb else "HxW or FxHxW"
        raise ValueError(f"{photometric} pixels must be {layout}, got shape {arr.shape}")
    frames = arr.shape[0] if arr.ndim == frame_ndim + 1 else 1
    rows, columns = arr.shape[-3:-1] if is_rgb else arr.shape[-2:]

    ds = _base_dataset(modality, view, patient_sex, patient_age)
    ds.SamplesPerPixel = 3 if is_rgb else 1
    ds.PhotometricInterpretation = photometric
    if is_rgb:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(rows), int(columns)
    if frames > 1:
        ds.NumberOfFrames = frames

    if arr.dtype == np.float32:
        if is_rgb or transfer_syntax not in NATIVE_SYNTAXES:
            raise ValueError("float32 pixels are written only as monochrome, uncompressed")
        ds.SOPClassUID = ParametricMapStorage
        ds.BitsAllocated = 32
        ds.FloatPixelData = arr.astype("<f4").tobytes()
    else:
        _set_integer_pixels(ds, arr, bits_stored, signed, frames, is_rgb)
    _set_value_transforms(ds, rescale, window, voi_lut)

    native = transfer_syntax if transfer_syntax in NATIVE_SYNTAXES else ExplicitVRLittleEndian
    ds.file_meta = _file_meta(ds, native)
    if transfer_syntax not in NATIVE_SYNTAXES:
        _compress(ds, arr, transfer_syntax, jpeg_quality)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def write_dicom(path: str | os.PathLike, pixels: np.ndarray, **options: Any) -> Path:
    """Write `pixels` to `path` as a DICOM file (atomically); `options` as in `dicom_bytes`."""
    path = Path(path)
    atomic_write_bytes(path, dicom_bytes(pixels, **options))
    return path


def image_to_dicom(image: str | os.PathLike, out: str | os.PathLike, monochrome1: bool) -> Path:
    """Wrap a PNG/JPEG (e.g. a phantom) into a 12-bit DX DICOM with synthetic identifiers,
    MONOCHROME1 (stored inverted, as some CR systems do) when asked. A small image is enlarged
    by a whole factor (each pixel repeated) to the chest check's smallest side, 256 px."""
    from cxrlite.imaging.decode import load_image
    from cxrlite.pacs.chest import MIN_SIDE

    pixels = np.round(load_image(image).pixels * 4095).astype(np.uint16)
    factor = -(-MIN_SIDE // min(pixels.shape))  # ceil
    if factor > 1:
        pixels = np.kron(pixels, np.ones((factor, factor), np.uint16))
    if monochrome1:
        pixels = 4095 - pixels
    return write_dicom(
        out,
        pixels,
        photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
        bits_stored=12,
        window=(2048.0, 4096.0),
    )


def _base_dataset(modality: str, view: str | None, sex: str | None, age: int | None) -> FileDataset:
    ds = FileDataset(None, {}, preamble=b"\0" * 128)
    # Placeholders in every identifying field, so readers are tested on files shaped like
    # real ones and can be checked not to echo these fields.
    ds.PatientName = "ANON^PHANTOM"
    ds.PatientID = "PHANTOM"
    ds.PatientBirthDate = "19000101"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20000101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.AccessionNumber = "PHANTOM0001"
    ds.InstitutionName = "PHANTOM INSTITUTION"
    ds.ReferringPhysicianName = "ANON^REFERRER"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "cxrlite phantom"
    if sex is not None:
        if sex not in ("F", "M", "O"):
            raise ValueError(f"patient_sex must be F, M or O, got {sex!r}")
        ds.PatientSex = sex
    if age is not None:
        if not 0 <= int(age) <= 999:
            raise ValueError(f"patient_age must be 0..999 years, got {age}")
        ds.PatientAge = f"{int(age):03d}Y"
    ds.Modality = modality
    ds.SOPClassUID = {
        "DX": DigitalXRayImageStorageForPresentation,
        "CR": ComputedRadiographyImageStorage,
    }.get(modality, SecondaryCaptureImageStorage)
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    if view is not None:
        ds.ViewPosition = view
    return ds


def _set_integer_pixels(
    ds: FileDataset, arr: np.ndarray, bits_stored: int | None, signed: bool, frames: int, rgb: bool
) -> None:
    if arr.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(f"pixels must be uint8, uint16, int16 or float32, got {arr.dtype}")
    if signed != (arr.dtype == np.int16):
        raise ValueError(f"signed={signed} does not match pixel dtype {arr.dtype}")
    allocated = arr.dtype.itemsize * 8
    bits = allocated if bits_stored is None else int(bits_stored)
    if not 1 <= bits <= allocated:
        raise ValueError(f"bits_stored must be 1..{allocated} for {arr.dtype}, got {bits}")
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if arr.size and (int(arr.min()) < low or int(arr.max()) > high):
        raise ValueError(f"pixel values exceed the {bits}-bit {'signed' if signed else ''} range")
    ds.BitsAllocated = allocated
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.SOPClassUID = (
            MultiFrameTrueColorSecondaryCaptureImageStorage
            if rgb
            else MultiFrameGrayscaleByteSecondaryCaptureImageStorage
            if allocated == 8
            else MultiFrameGrayscaleWordSecondaryCaptureImageStorage
        )
    ds.PixelData = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OB" if allocated == 8 else "OW"


def _set_value_transforms(
    ds: FileDataset,
    rescale: tuple[float, float] | None,
    window: tuple[float, float] | Sequence[tuple[float, float]] | None,
    voi_lut: VoiLut | None,
) -> None:
    if rescale is not None:
        slope, intercept = rescale
        ds.RescaleSlope = DSfloat(slope, auto_format=True)
        ds.RescaleIntercept = DSfloat(intercept, auto_format=True)
        ds.RescaleType = "US"  # unspecified units, as DX allows
    if window is not None:
        pairs = [window] if np.isscalar(window[0]) else list(window)
        centers = [DSfloat(c, auto_format=True) for c, _ in pairs]
        widths = [DSfloat(w, auto_format=True) for _, w in pairs]
        ds.WindowCenter = centers[0] if len(pairs) == 1 else centers
        ds.WindowWidth = widths[0] if len(pairs) == 1 else widths
    if voi_lut is not None:
        table = np.asarray(voi_lut.table)
        if not (voi_lut.bits == 8 or 10 <= voi_lut.bits <= 16):
            raise ValueError(f"VOI LUT bits must be 8 or 10..16, got {voi_lut.bits}")
        if table.ndim != 1 or not 1 <= len(table) <= 65536:
            raise ValueError("VOI LUT table must be 1-D with 1..65536 entries")
        if int(table.min()) < 0 or int(table.max()) >= 2**voi_lut.bits:
            raise ValueError(f"VOI LUT entries must fit in {voi_lut.bits} bits")
        item = pydicom.Dataset()
        # 65536 entries are written as 0, as PS3.3 C.11.1.1 says.
        item.LUTDescriptor = [len(table) % 65536, int(voi_lut.first_mapped), voi_lut.bits]
        item.LUTData = table.astype("<u2").tobytes()
        item["LUTData"].VR = "OW"
        ds.VOILUTSequence = [item]


def _file_meta(ds: FileDataset, transfer_syntax: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _compress(ds: FileDataset, arr: np.ndarray, syntax: UID, quality: int) -> None:
    if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
        # 8-bit data under JPEG Extended is written as a baseline-coded stream, which every
        # Process 2/4 decoder reads; 12-bit data would need a 12-bit encoder.
        if ds.BitsStored != 8 or ds.PixelRepresentation != 0:
            raise ValueError(
                f"{syntax.name} is written here for unsigned 8-bit pixels only: no encoder "
                "for 12-bit JPEG installs here (Pillow writes 8-bit JPEG, pylibjpeg-libjpeg "
                "only decodes)"
            )
        _encapsulate_pillow_jpeg(ds, arr, syntax, quality)
        return
    try:
        kwargs: dict = {"generate_instance_uid": False}
        if syntax == JPEG2000:
            kwargs["j2k_cr"] = [20.0]
        elif syntax == JPEGLSNearLossless:
            kwargs["jls_error"] = 2
        ds.compress(syntax, arr, **kwargs)
    except (RuntimeError, NotImplementedError) as e:
        raise ValueError(f"cannot encode {syntax.name} here: {e}") from e


def _encapsulate_pillow_jpeg(ds: FileDataset, arr: np.ndarray, syntax: UID, quality: int) -> None:
    """JPEG through Pillow's libjpeg: pydicom has no JPEG encoder."""
    is_rgb = ds.SamplesPerPixel == 3
    frames = arr if arr.ndim == (4 if is_rgb else 3) else arr[None]
    encoded = []
    for frame in frames:
        out = io.BytesIO()
        # 4:2:2 chroma subsampling matches the YBR_FULL_422 photometric interpretation that
        # PS3.5 8.2.1 prescribes for lossy JPEG of color images.
        Image.fromarray(frame).save(out, "JPEG", quality=quality, subsampling="4:2:2")
        encoded.append(out.getvalue())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    if is_rgb:
        ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.file_meta.TransferSyntaxUID = syntax
