"""Where SRs go and how: `dimse://AET@HOST:PORT` (a C-STORE SCU association) or
`dicomweb+http(s)://HOST:PORT/PATH` (STOW-RS: one multipart/related POST to PATH/studies).

Every failure is one line naming the destination and the problem (connection refused, the
association rejected and why, an HTTP status); a URL's user name and password never appear in
it (`Destination.label`). pynetdicom and httpx are imported inside the functions: without the
`pacs` extra only `require_pacs_extra` is reached, and it says what to install.
"""

from __future__ import annotations

import io
import re
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cxrlite.errors import CxrliteError

PACS_EXTRA = 'pip install "cxrlite[pacs]"'
DEFAULT_TIMEOUT_S = 30.0
# Storage statuses that mean "stored" (PS3.4 B.2.3: warnings coerced/elements discarded).
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


class DicomNetError(CxrliteError):
    """A destination could not be reached or refused what was sent."""


def require_pacs_extra(what: str) -> None:
    """One line saying what to install when pynetdicom is missing."""
    try:
        import pynetdicom  # noqa: F401
    except ImportError:
        raise CxrliteError(f"{what} needs the pacs extra: {PACS_EXTRA}") from None


def check_ae_title(title: str, what: str = "AE title") -> str:
    if not _AE_TITLE.match(title) or not title.strip():
        raise ValueError(f"{what} {title!r}: 1-16 printable characters, no backslash")
    return title.strip()


@dataclass(frozen=True)
class Destination:
    kind: str  # "dimse" or "dicomweb"
    label: str  # as given, without credentials: for messages, logs and the outbox sidecars
    host: str
    port: int
    ae_title: str | None = None  # dimse: the called AE title
    url: str | None = None  # dicomweb: the service root (credentials kept, for httpx)

    @property
    def text(self) -> str:
        """The string that parses back to this destination (credentials included)."""
        return f"dicomweb+{self.url}" if self.kind == "dicomweb" else self.label


def parse_destination(text: str) -> Destination:
    """`dimse://AET@HOST:PORT` or `dicomweb+http(s)://HOST[:PORT]/PATH`; ValueError otherwise."""
    usage = "use dimse://AET@HOST:PORT or dicomweb+http(s)://HOST:PORT/PATH"
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"destination {text!r}: bad port; {usage}") from None
    if parts.scheme == "dimse":
        if not parts.username or not parts.hostname or port is None or parts.path.strip("/"):
            raise ValueError(f"destination {text!r}: {usage}")
        ae = check_ae_title(parts.username, f"destination {text!r}: AE title")
        return Destination("dimse", f"dimse://{ae}@{parts.hostname}:{port}", parts.hostname,
                           port, ae_title=ae)  # fmt: skip
    if parts.scheme in ("dicomweb+http", "dicomweb+https") and parts.hostname:
        scheme = parts.scheme.split("+", 1)[1]
        url = text.split("+", 1)[1].rstrip("/")
        shown = parts.hostname + (f":{port}" if port else "")
        label = f"{parts.scheme}://{shown}{parts.path.rstrip('/')}"
        return Destination("dicomweb", label, parts.hostname,
                           port or (443 if scheme == "https" else 80), url=url)  # fmt: skip
    raise ValueError(f"destination {text!r}: {usage}")


def _connect_problem(host: str, port: int, timeout_s: float) -> str:
    """Why a TCP connection fails (pynetdicom only logs it): tried again to name the cause."""
    try:
        socket.create_connection((host, port), timeout=min(timeout_s, 5.0)).close()
    except ConnectionRefusedError:
        return "cannot connect (connection refused)"
    except TimeoutError:
        return "cannot connect (timed out)"
    except socket.gaierror:
        return f"cannot connect (unknown host {host!r})"
    except OSError as e:
        return f"cannot connect ({e.strerror or e})"
    return "cannot connect (the connection closed at once)"


def _associate(dest: Destination, contexts: Sequence[tuple[str, list[str]]],
               calling_ae: str, timeout_s: float) -> Any:  # fmt: skip
    """An established association with `dest`, or DicomNetError saying why not."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    connected: list[bool] = []
    handlers = [(evt.EVT_CONN_OPEN, lambda event: connected.append(True))]
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=handlers)
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        why = f"association rejected ({rj.result_str}, {rj.source_str}: {rj.reason_str})"
    elif not connected:
        why = _connect_problem(dest.host, dest.port, timeout_s)
    elif assoc.rejected_contexts and not assoc.accepted_contexts:
        why = "the peer accepted none of the proposed SOP classes / transfer syntaxes"
    elif assoc.is_aborted:
        why = "association aborted by the peer"
    else:
        why = f"no answer within {timeout_s:g} s"
    raise DicomNetError(f"{dest.label}: {why}")


def echo(dest: Destination, *, calling_ae: str = "CXRLITE",
         timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[str, float]:  # fmt: skip
    """(status text, round trip in ms): a C-ECHO, or a QIDO-RS query of a DICOMweb service."""
    if dest.kind == "dicomweb":
        t0 = time.perf_counter()
        response = _http("GET", dest, "/studies?limit=1", timeout_s, b"", {})
        ms = (time.perf_counter() - t0) * 1000
        if response.status_code >= 400:
            raise DicomNetError(f"{dest.label}: QIDO-RS answered HTTP {response.status_code}")
        return f"HTTP {response.status_code}", ms
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.sop_class import Verification

    syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assoc = _associate(dest, [(Verification, syntaxes)], calling_ae, timeout_s)
    try:
        t0 = time.perf_counter()
        status = assoc.send_c_echo()
        ms = (time.perf_counter() - t0) * 1000
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise DicomNetError(f"{dest.label}: no C-ECHO response (aborted or timed out)")
    if code != 0x0000:
        raise DicomNetError(f"{dest.label}: C-ECHO failed with status 0x{code:04X}")
    return "success (0x0000)", ms


def send_files(dest: Destination, files: Sequence[Path], *, calling_ae: str = "CXRLITE",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str | None]:  # fmt: skip
    """Store each DICOM file at `dest`: one association (or one STOW-RS request) for all.
    Returns, per file, None when stored or the problem; DicomNetError when nothing could be
    sent (connection, association, HTTP)."""
    if dest.kind == "dicomweb":
        return _stow(dest, [Path(f).read_bytes() for f in files], timeout_s)
    return _c_store(dest, files, calling_ae, timeout_s)


def _c_store(dest: Destination, files: Sequence[Path], calling_ae: str,
             timeout_s: float) -> list[str | None]:  # fmt: skip
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    datasets = [pydicom.dcmread(f) for f in files]
    contexts: dict[tuple[str, str], list[str]] = {}
    for ds in datasets:
        syntax = ds.file_meta.TransferSyntaxUID
        native = not syntax.is_compressed and not syntax.is_deflated
        key = (str(ds.SOPClassUID), "native" if native else str(syntax))
        contexts[key] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian] if native else [syntax]
    if len(contexts) > 128:
        raise DicomNetError(f"{dest.label}: more than 128 kinds of file in one send")
    assoc = _associate(dest, [(k[0], v) for k, v in contexts.items()], calling_ae, timeout_s)
    results: list[str | None] = []
    try:
        for ds in datasets:
            try:
                status = assoc.send_c_store(ds)
            except ValueError as e:  # no accepted context for this SOP class / syntax
                results.append(f"not sent: {e}".splitlines()[0])
                continue
            code = getattr(status, "Status", None)
            if code is None:
                results.append("no C-STORE response (aborted or timed out)")
                if not assoc.is_established:
                    results += ["association lost"] * (len(datasets) - len(results))
                    break
            else:
                results.append(None if code in STORED else f"C-STORE status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def _http(method: str, dest: Destination, path: str, timeout_s: float, body: bytes,
          headers: dict[str, str]) -> Any:  # fmt: skip
    import httpx

    try:
        return httpx.request(method, f"{dest.url}{path}", content=body or None,
                             headers=headers, timeout=timeout_s)  # fmt: skip
    except httpx.ConnectError as e:
        problem = "connection refused" if "refused" in str(e).lower() else str(e)
        raise DicomNetError(f"{dest.label}: cannot connect ({problem})") from None
    except httpx.TimeoutException:
        raise DicomNetError(f"{dest.label}: no answer within {timeout_s:g} s") from None
    except httpx.HTTPError as e:
        raise DicomNetError(f"{dest.label}: {type(e).__name__}: {e}") from None


def _stow(dest: Destination, parts: Sequence[bytes], timeout_s: float) -> list[str | None]:
    """STOW-RS (PS3.18 10.5): a multipart/related POST; the answer's FailedSOPSequence names
    what was not stored."""
    import pydicom

    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for part in parts:
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(part + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    response = _http("POST", dest, "/studies", timeout_s, body.getvalue(), headers)
    if response.status_code == 200:
        return [None] * len(parts)
    failed: dict[str, str] = {}
    try:
        for item in response.json().get("00081198", {}).get("Value", []):
            uid = item.get("00081155", {}).get("Value", ["?"])[0]
            reason = item.get("00081197", {}).get("Value", [0])[0]
            failed[uid] = f"STOW-RS failure reason 0x{int(reason):04X}"
    except (ValueError, AttributeError, TypeError):
        pass
    if not failed:
        if response.status_code < 300:
            return [None] * len(parts)
        return [f"STOW-RS answered HTTP {response.status_code}"] * len(parts)
    uids = [
        str(pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID) for p in parts
    ]
    return [failed.get(uid) for uid in uids]
