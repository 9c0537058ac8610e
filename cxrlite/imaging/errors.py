"""Typed errors for images that cannot be read.

Every error is an `ImageError` (a `ValueError`) with a stable `code` that the server turns
into an HTTP 4xx answer, and a message that names the source (file path or "upload") and
the problem. Messages never carry patient data: no DICOM tag values, no pixel values.
"""

from __future__ import annotations

from cxrlite.errors import CxrliteError


class ImageError(CxrliteError, ValueError):
    """An image that cannot be turned into model pixels; `code` is stable, for clients."""

    code = "image_error"
    http_status = 400

    def __init__(self, source: str, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


class NotAnImageError(ImageError):
    """Neither DICOM, PNG nor JPEG, or the image data itself is corrupt."""

    code = "not_an_image"
    http_status = 415


class TruncatedImageError(ImageError):
    """The file ends before the image data it declares."""

    code = "truncated"


class NoPixelDataError(ImageError):
    """A DICOM object without an image (a report, a presentation state, a header only)."""

    code = "no_pixel_data"
    http_status = 422


class UnsupportedTransferSyntaxError(ImageError):
    """DICOM pixel data compressed in a syntax that no installed plugin decodes."""

    code = "unsupported_transfer_syntax"
    http_status = 415

    def __init__(self, source: str, uid: str, name: str, needs: str):
        self.uid = uid
        self.syntax_name = name
        self.needs = needs
        super().__init__(source, f"transfer syntax {name} ({uid}) cannot be decoded here: {needs}")


class ImageTooLargeError(ImageError):
    """Zero-size or absurd dimensions, refused from the header before any pixel is decoded."""

    code = "image_too_large"
    http_status = 413


class DegenerateImageError(ImageError):
    """Pixels that carry no image: NaN/inf values or a constant image."""

    code = "degenerate_image"
    http_status = 422
