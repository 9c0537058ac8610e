"""The DICOM listener: a Storage SCP for chest radiographs and a Verification SCP (C-ECHO).

- The called AE title must be ours (an association addressed to another is rejected: "called
  AE title not recognised"); with an allow-list, the calling AE title and host must match an
  entry (`AET@HOST`, `AET` from any host, `*@HOST` any AE title from that host), else
  "calling AE title not recognised".
- Accepted: CR, DX (for presentation and for processing) and Secondary Capture images, in
  every transfer syntax listed in TRANSFER_SYNTAXES (pynetdicom's defaults accept only the
  uncompressed ones).
- A C-STORE answers success (0x0000) only once the instance is in the spool (fsynced); a data
  set that cannot be parsed or lacks its UIDs gets 0xC000, one that cannot be written 0xA700.
  The listener stays up either way. Reporting happens later, in the service's worker.
pynetdicom is imported inside the functions (the `pacs` extra).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)

from cxrlite.pacs.destinations import check_ae_title
from cxrlite.pacs.metrics import DicomMetrics
from cxrlite.pacs.spool import Spool

logger = logging.getLogger(__name__)

IMAGE_STORAGE = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
)
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,  # .4.50
    JPEGExtended12Bit,  # .4.51
    JPEGLossless,  # .4.57 (process 14)
    JPEGLosslessSV1,  # .4.70
    JPEGLSLossless,  # .4.80
    JPEGLSNearLossless,  # .4.81
    JPEG2000Lossless,  # .4.90
    JPEG2000,  # .4.91
    RLELossless,  # .5
)
SUCCESS, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0000, 0xC000, 0xA700


class AllowList:
    """Calling AE titles and hosts that may associate; empty: everyone (who calls us by name)."""

    def __init__(self, entries: Sequence[str]) -> None:
        self.rules: list[tuple[str | None, frozenset[str] | None]] = []
        for entry in entries:
            aet, _, host = entry.rpartition("@") if "@" in entry else (entry, "", "*")
            title = None if aet in ("", "*") else check_ae_title(aet, f"allow entry {entry!r}:")
            self.rules.append((title, None if host in ("", "*") else _addresses(entry, host)))

    def permits(self, calling_ae: str, peer_ip: str) -> bool:
        if not self.rules:
            return True
        ip = _normal_ip(peer_ip)
        return any(
            (title is None or title == calling_ae.strip()) and (hosts is None or ip in hosts)
            for title, hosts in self.rules
        )


def _normal_ip(ip: str) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _addresses(entry: str, host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise ValueError(f"allow entry {entry!r}: unknown host {host!r}") from None
    return frozenset(_normal_ip(str(info[4][0])) for info in infos)


def _on_requested(ae_title: str, allow: AllowList) -> Callable[[Any], None]:
    def check(event: Any) -> None:
        request = event.assoc.requestor.primitive
        calling = str(request.calling_ae_title).strip()
        peer = str(event.assoc.requestor.address)
        if str(request.called_ae_title).strip() != ae_title:
            logger.warning("DICOM association from %s (%s) rejected: it called another AE "
                           "title, not %s", peer, calling, ae_title)  # fmt: skip
            return  # pynetdicom's require_called_aet rejects it
        if not allow.permits(calling, peer):
            logger.warning("DICOM association from %s (%s) rejected: not on the allow-list",
                           peer, calling)  # fmt: skip
            event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # calling AE title not recognised
            event.assoc.kill()

    return check


def _on_store(spool: Spool, metrics: DicomMetrics, received: Callable[[], None]) -> Callable:
    def store(event: Any) -> int:
        try:
            ds = event.dataset
            study, sop = str(ds.StudyInstanceUID).strip(), str(ds.SOPInstanceUID).strip()
            if not study or not sop:
                raise ValueError("empty UID")
            for _ in ds:  # parse every element: a garbled data set fails here
                pass
            _check_pixel_length(ds, event.context.transfer_syntax)
            data = event.encoded_dataset(include_meta=True)
        except Exception as e:  # noqa: BLE001 - any parse failure is the sender's problem
            metrics.store_failures.labels("unreadable").inc()
            logger.warning("C-STORE refused (0xC000): the data set cannot be parsed (%s)",
                           type(e).__name__)  # the message could quote values  # fmt: skip
            return CANNOT_UNDERSTAND
        try:
            spool.store(study, sop, data)
        except OSError as e:
            metrics.store_failures.labels("write").inc()
            logger.error("C-STORE refused (0xA700): cannot write to the spool: %s", e.strerror)
            return OUT_OF_RESOURCES
        metrics.received.inc()
        received()
        return SUCCESS

    return store


def _check_pixel_length(ds: Any, syntax: Any) -> None:
    """A cut-off native Pixel Data fails (pydicom reads a short value without complaint)."""
    if "PixelData" not in ds or getattr(syntax, "is_encapsulated", True):
        return
    bits = int(ds.get("BitsAllocated", 8))
    samples = int(ds.get("Rows", 0)) * int(ds.get("Columns", 0)) * int(ds.get("SamplesPerPixel", 1))
    expected = (samples * int(ds.get("NumberOfFrames", 1) or 1) * bits + 7) // 8
    if len(ds.PixelData) < expected:
        raise ValueError("pixel data shorter than Rows x Columns x frames say")


def start_scp(host: str, port: int, ae_title: str, allow: AllowList, spool: Spool,
              metrics: DicomMetrics, received: Callable[[], None]) -> Any:  # fmt: skip
    """Listen in background threads; returns pynetdicom's server (`.server_address`,
    `.shutdown()`). OSError when the port cannot be bound."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = 16
    ae.add_supported_context(Verification)
    for sop_class in IMAGE_STORAGE:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    handlers = [
        (evt.EVT_REQUESTED, _on_requested(ae_title, allow)),
        (evt.EVT_C_ECHO, lambda event: SUCCESS),
        (evt.EVT_C_STORE, _on_store(spool, metrics, received)),
    ]
    return ae.start_server((host, port), block=False, evt_handlers=handlers)


def quiet_dicom_libraries() -> None:
    """pynetdicom logs every association and message at INFO (UIDs among them) and can log
    request identifiers; highdicom logs the UIDs of the data sets an SR is built from: keep
    both to warnings (and pynetdicom from logging identifiers), unless someone chose a level
    for them."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    for name in ("pynetdicom", "highdicom"):
        library_logger = logging.getLogger(name)
        if library_logger.level == logging.NOTSET:
            library_logger.setLevel(logging.WARNING)
