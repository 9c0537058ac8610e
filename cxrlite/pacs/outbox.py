"""The outbox: SRs (and PDFs) waiting for delivery, on disk, and the thread that delivers them.

    OUTBOX/<key>.dcm    the object (Part 10), written first
    OUTBOX/<key>.json   its sidecar, written second (an object without one is unfinished):
                        {"destination", "object", "attempts", "next_try", "received_at",
                         "created_at", "last_error"}

A failed attempt is kept: attempts + 1 and the next try after an exponential backoff
(base * 2^(attempts-1), capped). The outbox is re-read at every pass, so what was pending
before a restart is delivered after it. A delivered object is removed (sidecar first). The
sidecar names its destination by its label (no password); an item whose destination is no
longer configured waits, with a warning, until it is again. Keys are `<study key>.<object>.
<destination hash>`: a study reported twice (a crash between report and spool clean-up)
replaces its pending object instead of sending it twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrlite.fileio import atomic_write_bytes, write_json
from cxrlite.pacs.spool import fsync_dir, private_dir

logger = logging.getLogger(__name__)

BATCH = 32  # objects sent on one association / in one STOW-RS request


@dataclass
class OutboxItem:
    key: str
    path: Path  # the .dcm
    meta: dict[str, Any]

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


class Outbox:
    def __init__(self, root: Path, *, retry_base_s: float = 2.0, retry_cap_s: float = 300.0):
        self.root, self.retry_base_s, self.retry_cap_s = root, retry_base_s, retry_cap_s

    def open(self) -> None:
        """Create the folder; remove temp files and objects whose sidecar was never written."""
        private_dir(self.root)
        for tmp in self.root.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        for path in self.root.glob("*.dcm"):
            if not path.with_suffix(".json").exists():
                path.unlink(missing_ok=True)

    def put(self, study_key: str, kind: str, data: bytes, destination: str,
            received_at: float) -> OutboxItem:  # fmt: skip
        """Queue one object for one destination (durably, before the spool lets the study go)."""
        dest_hash = hashlib.sha256(destination.encode()).hexdigest()[:8]
        key = f"{study_key}.{kind}.{dest_hash}"
        item = OutboxItem(key, self.root / f"{key}.dcm", {
            "destination": destination, "object": kind, "attempts": 0,
            "next_try": time.time(), "received_at": received_at,
            "created_at": time.time(), "last_error": None,
        })  # fmt: skip
        atomic_write_bytes(item.path, data)
        write_json(item.sidecar, item.meta)
        fsync_dir(self.root)
        return item

    def items(self) -> list[OutboxItem]:
        found = []
        for sidecar in sorted(self.root.glob("*.json")):
            try:
                meta = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # removed meanwhile, or being replaced
            found.append(OutboxItem(sidecar.stem, sidecar.with_suffix(".dcm"), meta))
        return sorted(found, key=lambda item: item.meta["next_try"])

    def depth(self) -> int:
        return sum(1 for _ in self.root.glob("*.json")) if self.root.is_dir() else 0

    def _current(self, item: OutboxItem) -> bool:
        """Whether `item` is still what is queued under its key (not replaced by a newer
        report of its study while it was being sent)."""
        try:
            meta = json.loads(item.sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return meta.get("created_at") == item.meta["created_at"]

    def delivered(self, item: OutboxItem) -> None:
        if self._current(item):
            item.sidecar.unlink(missing_ok=True)
            item.path.unlink(missing_ok=True)

    def retry_later(self, item: OutboxItem, problem: str) -> float:
        """Record a failed attempt; returns the seconds until the next."""
        attempts = int(item.meta["attempts"]) + 1
        delay = min(self.retry_cap_s, self.retry_base_s * 2 ** (attempts - 1))
        item.meta.update(attempts=attempts, next_try=time.time() + delay, last_error=problem)
        if self._current(item):
            write_json(item.sidecar, item.meta)
        return delay


# send(destination label, files) -> per file: None (stored) or the problem. Raises for a
# failure of the whole batch (connection, association), which then counts for every file.
SendFn = Callable[[str, Sequence[Path]], list[str | None]]


class Sender:
    """Delivers due outbox items in a background thread; `wake()` after a `put`."""

    def __init__(self, outbox: Outbox, send: SendFn, known: Callable[[str], bool],
                 on_result: Callable[[OutboxItem, str | None], None], poll_s: float = 1.0):  # fmt: skip
        self.outbox, self.send, self.known, self.on_result = outbox, send, known, on_result
        self.poll_s = poll_s
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cxrlite-dicom-send", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.deliver_due()
            except Exception as e:  # noqa: BLE001 - a bug must not stop deliveries for good
                # The type only: a message could quote a value; -vv shows the traceback.
                logger.error("outbox pass failed (%s)", type(e).__name__)
                logger.debug("outbox pass failed", exc_info=True)
                wait = self.poll_s
            self._wake.wait(max(0.01, min(wait, self.poll_s)))
            self._wake.clear()

    def deliver_due(self) -> float:
        """Send every due item once; returns the seconds until the next one is due."""
        now = time.time()
        groups: dict[str, list[OutboxItem]] = {}
        next_due = float("inf")
        for item in self.outbox.items():
            dest = item.meta["destination"]
            if not self.known(dest):
                if dest not in self._warned:
                    self._warned.add(dest)
                    logger.warning("outbox: %s is not a configured destination; its "
                                   "objects wait until it is", dest)  # fmt: skip
                continue
            if item.meta["next_try"] > now:
                next_due = min(next_due, item.meta["next_try"])
                continue
            groups.setdefault(dest, []).append(item)
        for dest, items in groups.items():
            for start in range(0, len(items), BATCH):
                if self._stop.is_set():
                    return 0.0
                self._send_batch(dest, items[start : start + BATCH])
        return 0.0 if groups else next_due - now

    def _send_batch(self, dest: str, items: list[OutboxItem]) -> None:
        try:
            results = self.send(dest, [item.path for item in items])
        except Exception as e:  # noqa: BLE001 - DicomNetError, or a file gone: retried later
            results = [str(e) or type(e).__name__] * len(items)
        for item, problem in zip(items, results, strict=True):
            if problem is None:
                self.outbox.delivered(item)
            else:
                delay = self.outbox.retry_later(item, problem)
                with contextlib.suppress(Exception):
                    logger.warning("outbox %s to %s failed (attempt %d, next in %.0f s): %s",
                                   item.key, dest, item.meta["attempts"], delay, problem)  # fmt: skip
            self.on_result(item, problem)
