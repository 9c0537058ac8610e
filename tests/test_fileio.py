"""fileio: staging folders of interrupted writers are cleaned on the next run (a live writer's are
kept); JSONL reading names the file it cannot read."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cxrlite.bundle import BundleError
from cxrlite.export.bundle import create_bundle
from cxrlite.fileio import atomic_dir, remove_stale_staging, staging_dir
from cxrlite.model.checkpoint import CheckpointError


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_folders_of_exited_writers_are_removed(tmp_path, dead_pid):
    stale = tmp_path / f".tmp-out-{dead_pid}.abc"
    live = tmp_path / f".tmp-out-{os.getppid()}.def"
    mine = staging_dir(tmp_path, ".tmp-out-")
    other_bundle = tmp_path / f".tmp-out-2-{dead_pid}.ghi"  # staging of a bundle named "out-2"
    for folder in (stale, live, other_bundle):
        folder.mkdir()
    assert mine.name.startswith(f".tmp-out-{os.getpid()}.")
    assert remove_stale_staging(tmp_path, ".tmp-out-") == [stale]
    assert not stale.exists() and live.is_dir() and mine.is_dir() and other_bundle.is_dir()


def test_an_interrupted_export_is_cleaned_by_the_next_one(tmp_path, dead_pid):
    stale = tmp_path / f".tmp-bundle-{dead_pid}.xyz"
    (stale / "vision").mkdir(parents=True)
    (stale / "vision" / "vision-fp32.onnx").write_bytes(b"half written")
    with pytest.raises((CheckpointError, BundleError)):
        create_bundle(tmp_path / "no-checkpoint", tmp_path / "bundle")
    assert not stale.exists()
    assert not list(tmp_path.glob(".tmp-bundle-*"))  # the failed run's own staging is gone too


def test_an_interrupted_checkpoint_save_is_cleaned_by_the_next_one(tmp_path, dead_pid):
    stale = tmp_path / f".ckpt.{dead_pid}.abc.tmp"
    stale.mkdir()
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not stale.exists() and (tmp_path / "ckpt" / "config.json").is_file()


def test_a_binary_file_is_named_when_read_as_jsonl(tmp_path):
    from cxrlite.fileio import read_jsonl

    binary = tmp_path / "tasks.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(ValueError, match="tasks.jsonl: not UTF-8 text"):
        read_jsonl(binary)
