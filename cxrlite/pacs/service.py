"""The DICOM service: C-STORE in -> spool -> (quiet period) -> chest check -> report on the
frontal image -> SR (+ PDF) -> outbox -> destinations. Three parts run side by side: the SCP's
threads (answer fast: spool, then success), one reporter thread (the study pipeline) and one
sender thread (the outbox).

    service = DicomService(DicomSettings(port=11112, destinations=("dimse://PACS@host:4242",)),
                           runtime)
    service.start(); ...; service.stop()

`runtime` is a cxrlite.runtime.Runtime or a function that returns it (None while it loads:
studies then wait in the spool). `execute(work)` runs `work(cancelled)` where the LLM runs (in
`cxrlite serve`, a job on the server's one LLM worker; by default here, under a lock).
Nothing patient-related is logged: studies and instances are named by their spool key (the
first 16 hex digits of the SHA-256 of the UID, see spool.uid_key), refusals by their reason.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrlite.fileio import atomic_write_bytes
from cxrlite.imaging.decode import DEFAULT_MAX_PIXELS
from cxrlite.pacs.destinations import (
    DEFAULT_TIMEOUT_S,
    check_ae_title,
    parse_destination,
    require_pacs_extra,
    send_files,
)
from cxrlite.pacs.metrics import DicomMetrics
from cxrlite.pacs.outbox import Outbox, OutboxItem, Sender
from cxrlite.pacs.scp import AllowList, quiet_dicom_libraries, start_scp
from cxrlite.pacs.spool import Spool, SpooledStudy

logger = logging.getLogger(__name__)

LATERAL_NOTE = "lateral present"  # in the log; the SR says it in a sentence (LATERAL_COMMENT)
LATERAL_COMMENT = (
    "A lateral view is also in the study (lateral present); this draft reads the frontal view."
)


def default_spool_dir() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "cxrlite" / "dicom"


@dataclass
class DicomSettings:
    port: int
    ae_title: str = "CXRLITE"
    host: str = "127.0.0.1"
    destinations: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    spool_dir: Path = field(default_factory=default_spool_dir)
    quiet_s: float = 10.0  # no new instance of a study for this long: the study is complete
    pdf: bool = False  # also an Encapsulated PDF of each report
    max_tokens: int = 128
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry_base_s: float = 2.0
    retry_cap_s: float = 300.0
    send_timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        self.ae_title = check_ae_title(self.ae_title)
        self.spool_dir = Path(self.spool_dir)
        parsed = [parse_destination(text) for text in self.destinations]  # ValueError: bad one
        self.targets = {dest.label: dest for dest in parsed}
        self.allow_list = AllowList(self.allow)  # ValueError: a bad entry or unknown host
        if not 0 <= self.port <= 65535:
            raise ValueError(f"DICOM port must be 0-65535, got {self.port}")
        if self.quiet_s < 0 or self.retry_base_s <= 0 or self.retry_cap_s < self.retry_base_s:
            raise ValueError("quiet period >= 0 s and 0 < retry base <= retry cap, please")


class LockedExecutor:
    """Run `work(cancelled)` under a lock: the runtime decodes one sequence at a time."""

    def __init__(self, cancelled: threading.Event) -> None:
        self._lock, self._cancelled = threading.Lock(), cancelled

    def __call__(self, work: Callable[[threading.Event], Any]) -> Any:
        with self._lock:
            return work(self._cancelled)


class DicomService:
    def __init__(self, settings: DicomSettings, runtime: Any, *,
                 metrics: DicomMetrics | None = None,
                 execute: Callable[[Callable[[threading.Event], Any]], Any] | None = None):  # fmt: skip
        self.settings, self.metrics = settings, metrics or DicomMetrics()
        self._runtime = runtime if callable(runtime) else (lambda: runtime)
        self.stopping = threading.Event()
        self.execute = execute or LockedExecutor(self.stopping)
        root = settings.spool_dir
        self.spool = Spool(root)
        self.kept = root / "reports"  # where reports go when there is no destination
        self.outbox = Outbox(root / "outbox", retry_base_s=settings.retry_base_s,
                             retry_cap_s=settings.retry_cap_s)  # fmt: skip
        self.sender = Sender(self.outbox, self._send, settings.targets.__contains__,
                             self._delivered, poll_s=min(1.0, settings.retry_base_s))  # fmt: skip
        self.metrics.watch_outbox(self.outbox.depth)
        self._wake = threading.Event()
        self._reporter: threading.Thread | None = None
        self._server: Any = None
        self._models: dict[int, dict[str, Any]] = {}

    @property
    def port(self) -> int:
        """The port listened on (the one chosen when settings.port is 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Open the spool and outbox (what a previous run left is picked up), listen, and start
        the reporter and sender threads. OSError when the port cannot be bound."""
        require_pacs_extra("DICOM networking (--dicom-port)")
        quiet_dicom_libraries()
        s = self.settings
        self.spool.open()
        self.outbox.open()
        self._server = start_scp(s.host, s.port, s.ae_title, s.allow_list, self.spool,
                                 self.metrics, self._wake.set)  # fmt: skip
        self._reporter = threading.Thread(target=self._report_loop, name="cxrlite-dicom-report",
                                          daemon=True)  # fmt: skip
        self._reporter.start()
        self.sender.start()
        if not s.targets:
            logger.warning("no DICOM destination: reports are kept in %s", self.kept)
        logger.info("DICOM SCP %s listening on %s:%d", s.ae_title, s.host, self.port)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop listening, cancel a report in progress (its study stays in the spool) and
        join the threads. What is spooled or in the outbox stays for the next start."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.stopping.set()
        self._wake.set()
        if self._reporter is not None:
            self._reporter.join(timeout_s)
        self.sender.stop(timeout_s)

    # --- the reporter -----------------------------------------------------------------------

    def _report_loop(self) -> None:
        while not self.stopping.is_set():
            wait = 1.0
            try:
                wait = self.report_ready()
            except Exception as e:  # noqa: BLE001 - a bug must not stop the reporter for good
                # The type only: a message could quote a value; -vv shows the traceback.
                logger.error("DICOM reporter pass failed (%s)", type(e).__name__)
                logger.debug("DICOM reporter pass failed", exc_info=True)
            self._wake.wait(min(1.0, max(0.02, wait)))  # a C-STORE wakes it too
            self._wake.clear()

    def report_ready(self) -> float:
        """Report every study whose quiet period has passed; the seconds until the next one's
        will (at most 1: the runtime may become ready meanwhile)."""
        runtime = self._runtime()
        if runtime is None:
            return 1.0  # still loading: the studies wait in the spool
        if not self._models:  # the SR builder's imports and the bundle's hash, before a study
            self._model(runtime)
        quiet = self.settings.quiet_s
        for study in self.spool.ready(quiet):
            if self.stopping.is_set():
                return 0.0
            try:
                self._report_study(runtime, study)
            except Exception as e:  # noqa: BLE001 - kept for a person, never lost
                if self.stopping.is_set():
                    return 0.0  # cancelled by shutdown: reported at the next start
                where = self.spool.quarantine(study)
                self.metrics.report_failures.inc()
                logger.error("study %s: report failed (%s); its instances are kept in %s",
                             study.key, type(e).__name__, where)  # fmt: skip
        waiting = [s.last_received + quiet - time.time() for s in self.spool.studies()]
        return min(waiting, default=1.0)

    def _refuse(self, study: SpooledStudy, instance: str, reason: str, code: str) -> None:
        self.metrics.refused.labels(code).inc()
        # Study and instance keys: SHA-256 of their UIDs, first 16 hex digits (spool.uid_key).
        logger.info("study %s: instance %s refused: %s", study.key, instance, reason)

    def _report_study(self, runtime: Any, study: SpooledStudy) -> None:
        from cxrlite.pacs.chest import (
            REFUSALS,
            chest_radiograph_refusal,
            read_dicom_header,
            view_position,
        )

        accepted: list[tuple[Path, Any, str]] = []
        for path in study.files:
            ds = read_dicom_header(path)
            if ds is None:
                self._refuse(study, path.stem, "unreadable", "unreadable")
                continue
            reason = chest_radiograph_refusal(ds)
            if reason is not None:
                self._refuse(study, path.stem, reason, REFUSALS.get(reason, "other"))
                continue
            accepted.append((path, ds, view_position(ds)))
        views = [view for _, _, view in accepted]
        chosen = next((a for a in accepted if a[2] == "frontal"), None)
        chosen = chosen or next((a for a in accepted if a[2] == "unknown"), None)
        if chosen is None:
            if accepted:  # laterals only
                self._refuse(study, "-", "no frontal view", "no_frontal_view")
            logger.info("study %s: nothing to report", study.key)
            self.spool.done(study)
            return
        path, source, view = chosen
        report = self._draft(runtime, study, path)
        if report is None:
            return
        lateral = "lateral" in views
        objects = self._objects(runtime, source, report, lateral)
        for kind, data in objects:
            for target in self.settings.targets:
                self.outbox.put(study.key, kind, data, target, study.last_received)
            if not self.settings.targets:  # kept on disk for a person (or a later tool)
                atomic_write_bytes(self.kept / f"{study.key}.{kind}.dcm", data)
        self.spool.done(study)
        self.metrics.reported.inc()
        self.sender.wake()
        logger.info("study %s reported from a %s image%s: %s to %d destination(s)", study.key,
                    view, f"; {LATERAL_NOTE}" if lateral else "",
                    "+".join(kind for kind, _ in objects), len(self.settings.targets))  # fmt: skip

    def _draft(self, runtime: Any, study: SpooledStudy, path: Path) -> dict[str, Any] | None:
        """The report of the chosen image, or None (refused as undecodable, or cancelled by
        shutdown: the study then stays in the spool)."""
        from cxrlite.imaging.decode import load_image
        from cxrlite.imaging.errors import ImageError

        try:
            image = load_image(path, name="dicom instance", max_pixels=self.settings.max_pixels)
            embedded = runtime.image_embeddings(image)
        except ImageError as e:
            self._refuse(study, path.stem, f"cannot decode ({e.code})", "undecodable")
            self.spool.done(study)
            return None
        max_tokens = self.settings.max_tokens
        report = self.execute(
            lambda cancelled: runtime.report(embedded, max_tokens=max_tokens, cancelled=cancelled)
        )
        if "cancelled" in (report.get("finish_reason") or {}).values():
            raise InterruptedError("report cancelled")  # shutdown: stays in the spool
        return report

    def _model(self, runtime: Any) -> dict[str, Any]:
        from cxrlite.pacs.sr import model_identity  # imports highdicom (half a second)

        if id(runtime) not in self._models:
            self._models[id(runtime)] = model_identity(runtime.bundle)
        return self._models[id(runtime)]

    def _objects(self, runtime: Any, source: Any, report: dict[str, Any],
                 lateral: bool) -> list[tuple[str, bytes]]:  # fmt: skip
        from cxrlite.pacs.sr import build_report_sr

        model = self._model(runtime)
        sr = build_report_sr(source, report, model=model)
        if lateral:
            add_comment(sr, LATERAL_COMMENT)
        objects = [("sr", part10(sr))]
        if self.settings.pdf:
            from cxrlite.pacs.pdf import build_report_pdf, encapsulated_pdf

            pdf = build_report_pdf(source, report, model=model)
            objects.append(("pdf", part10(encapsulated_pdf(source, pdf, model=model))))
        return objects

    # --- the sender -------------------------------------------------------------------------

    def _send(self, label: str, files: Sequence[Path]) -> list[str | None]:
        return send_files(self.settings.targets[label], files, calling_ae=self.settings.ae_title,
                          timeout_s=self.settings.send_timeout_s)  # fmt: skip

    def _delivered(self, item: OutboxItem, problem: str | None) -> None:
        kind = str(item.meta.get("object", "sr"))
        if problem is not None:
            self.metrics.send_failures.labels(kind).inc()
            return
        self.metrics.sent.labels(kind).inc()
        if kind == "sr":
            self.metrics.delivery_time.observe(max(0.0, time.time() - item.meta["received_at"]))
        logger.info("outbox %s delivered to %s", item.key, item.meta["destination"])


def part10(ds: Any) -> bytes:
    """A data set as DICOM file bytes (preamble, file meta)."""
    import pydicom

    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def add_comment(sr: Any, text: str) -> None:
    """Append a CONTAINS TEXT "Comment" (DCM 121106) to an SR's root container."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    comment = hd.sr.TextContentItem(
        codes.DCM.Comment, text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    sr.ContentSequence.append(comment)
