"""Atomic file writes and JSONL helpers.

Every artifact cxrlite writes (manifests, checkpoints, bundles, reports) goes through a temp
file in the same folder followed by `os.replace`, so a crash never leaves a half-written file
under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """mkstemp/mkdtemp create 0600/0700; what we write (models, bundles, reports) must be
    readable by a service user, as if created normally under the umask."""
    mask = _umask()
    path = Path(path)
    if path.is_dir():
        os.chmod(path, 0o777 & ~mask)
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", fsync: bool = True, **kwargs: Any
) -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit (fsync and) rename it over `path`.

    fsync=False still never exposes a partial file under the final name; it only skips the
    durability flush, which bulk writers (thousands of phantom PNGs) cannot afford per file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """A temp file path beside `path` for writers that open files by name (GGUF, llama.cpp's
    quantizer); renamed over `path` when the block ends cleanly, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def staging_dir(parent: Path, prefix: str, suffix: str = "") -> Path:
    """A new temp folder in `parent` named `<prefix><pid>.<random><suffix>`: the process id lets
    a later run tell an interrupted writer's leftovers (its process gone) from a live writer's."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", suffix=suffix, dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(parent: Path, prefix: str) -> list[Path]:
    """Delete the folders `staging_dir(parent, prefix)` made for writers that have exited (a
    killed export, an interrupted checkpoint save); a live writer's folder is kept."""
    removed = []
    for path in sorted(parent.glob(f"{prefix}*")) if parent.is_dir() else []:
        pid = path.name[len(prefix) :].split(".", 1)[0]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, replaceable: Callable[[Path], bool] = lambda p: False
) -> Iterator[Path]:
    """A temp folder beside `path` that replaces it when the block ends cleanly. An existing
    non-empty folder is replaced only if `replaceable(path)` says it is ours (never user data)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not replaceable(out))):
        raise FileExistsError(
            f"{out}: exists and is not something cxrlite wrote; refusing to replace it"
        )
    remove_stale_staging(out.parent, f".{out.name}.")
    tmp = staging_dir(out.parent, f".{out.name}.", suffix=".tmp")
    try:
        yield tmp
        make_readable(tmp)
        old = None
        if out.exists():
            # rename() replaces only an empty folder: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_open(path, "wb", fsync=fsync) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line (or a binary file) raises ValueError naming the file."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text, so not JSONL") from None
    return rows
