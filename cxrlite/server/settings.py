"""`ServerSettings`: the limits and policies of one server. The single source of their defaults:
`cxrlite serve` reads its options' defaults from here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cxrlite.imaging.decode import DEFAULT_MAX_PIXELS


@dataclass
class ServerSettings:
    api_key: str | None = None
    max_queue: int = 16  # requests admitted and waiting (image work included); more get 503
    request_timeout_s: float = 300.0  # request received -> answer complete, else 504
    max_tokens_cap: int = 512  # no request generates more (and max_tokens defaults to it)
    max_body_mb: float = 64.0  # room for a large DICOM radiograph, plus a third for base64
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_image_hosts: tuple[str, ...] = ()
    image_fetch_timeout_s: float = 10.0
    cors_origins: tuple[str, ...] = ()
    log_phi: bool = False
    image_workers: int = 2
    retry_after_s: int = 2
    report_max_tokens: int = 128
    dicom: Any = None  # cxrlite.pacs.service.DicomSettings: the DICOM listener (--dicom-port)

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_tokens_cap", "image_workers", "report_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "max_body_mb", "image_fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def retry_after(self) -> dict[str, str]:
        """The header that tells a refused client when to try again."""
        return {"Retry-After": str(self.retry_after_s)}
