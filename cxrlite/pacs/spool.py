"""The spool: every received instance on disk before its C-STORE is answered, so a study whose
C-STORE succeeded is reported even if the process dies right after. The spool is the queue.

    SPOOL/incoming/<study key>/<instance key>.dcm     one folder per study
    SPOOL/failed/<study key>.<time>/                  studies whose report crashed, for a person

Keys are the first 16 hex digits of the SHA-256 of the StudyInstanceUID / SOPInstanceUID: no
UID (and no patient data) in a file name, and the same instance sent twice replaces itself.
Logs name a study by its key (a hash, never the UID). Each file is written to a temp file,
fsynced, renamed, and the folder fsynced. A file's mtime is its receipt time (it survives a
restart, for the receipt-to-delivery metric).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cxrlite.fileio import atomic_write_bytes


def uid_key(uid: str) -> str:
    """A UID's file-name and log key: SHA-256, first 16 hex digits (never the UID itself)."""
    return hashlib.sha256(str(uid).strip().encode()).hexdigest()[:16]


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def private_dir(folder: Path) -> Path:
    """Create `folder` readable by this user only: it holds patient images."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return folder


@dataclass(frozen=True)
class SpooledStudy:
    key: str
    folder: Path
    files: tuple[Path, ...]
    first_received: float  # wall clock (time.time()) of its first and last instance
    last_received: float


class Spool:
    def __init__(self, root: Path) -> None:
        self.incoming = root / "incoming"
        self.failed = root / "failed"
        self._lock = threading.Lock()  # a folder is never removed while a store creates it

    def open(self) -> None:
        """Create the folders and remove temp files of writes a crash interrupted."""
        private_dir(self.incoming.parent)
        self.incoming.mkdir(exist_ok=True)
        for tmp in self.incoming.glob("*/.*.tmp"):
            tmp.unlink(missing_ok=True)

    def store(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance (Part 10 bytes) durably; OSError if it cannot be."""
        folder = self.incoming / uid_key(study_uid)
        path = folder / f"{uid_key(sop_uid)}.dcm"
        with self._lock:
            folder.mkdir(exist_ok=True)
        atomic_write_bytes(path, data)
        fsync_dir(folder)
        return path

    def studies(self) -> list[SpooledStudy]:
        """The studies waiting, oldest last receipt first."""
        found = []
        for folder in self.incoming.iterdir() if self.incoming.is_dir() else ():
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            files, times = [], []
            for path in sorted(folder.glob("*.dcm")):
                with contextlib.suppress(FileNotFoundError):
                    times.append(path.stat().st_mtime)
                    files.append(path)
            if files:
                found.append(
                    SpooledStudy(folder.name, folder, tuple(files), min(times), max(times))
                )
        return sorted(found, key=lambda s: s.last_received)

    def ready(self, quiet_s: float, now: float | None = None) -> list[SpooledStudy]:
        """Studies that received nothing for `quiet_s` seconds: complete, as far as we know."""
        now = time.time() if now is None else now
        return [s for s in self.studies() if now - s.last_received >= quiet_s]

    def done(self, study: SpooledStudy) -> None:
        """Remove the instances a report (or refusal) used; instances that arrived meanwhile
        stay, and form the next batch of the study."""
        for path in study.files:
            path.unlink(missing_ok=True)
        with self._lock, contextlib.suppress(OSError):
            study.folder.rmdir()  # only when empty
        fsync_dir(self.incoming)

    def quarantine(self, study: SpooledStudy) -> Path:
        """Move a study whose report crashed out of the queue (kept, never deleted)."""
        target = self.failed / f"{study.key}.{int(time.time())}"
        target.mkdir(parents=True, exist_ok=True)
        for path in study.files:
            with contextlib.suppress(FileNotFoundError):
                shutil.move(path, target / path.name)
        with self._lock, contextlib.suppress(OSError):
            study.folder.rmdir()
        return target
