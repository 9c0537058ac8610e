"""The deployment bundle format: a folder with manifest.json and every artifact `cxrlite serve` loads.

This module reads and verifies bundles (the runtime's side); `cxrlite.export.bundle` writes them.

The manifest lists every other file with its size and sha256, the model and preprocessing
configs, the prompt template, the checkpoint it came from, and the variants:
  vision: {"onnx-fp32" | "onnx-fp16" | "onnx-int8" | "tensorrt-fp16" ...: {file, kind, dtype,
           parity, ...}}
  llm:    {"gguf-f16" | "gguf-q4_k_m" | "gptq-4bit" ...: {file (a file or folder), kind, ...}}
  quality: {variant: measured quality}, default: {"vision": name, "llm": name}
Files not listed in the manifest are not part of the bundle: they are ignored on load.

A `.tmp-*` folder is a writer's staging area (an interrupted export): `load_bundle` refuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cxrlite.errors import CxrliteError
from cxrlite.imaging.preprocess import PreprocessConfig
from cxrlite.model.config import ModelConfig

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "cxrlite-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TOKENIZER_DIR = "tokenizer"
STAGING_PREFIX = ".tmp-"


class Key:
    """Top-level manifest keys: one spelling for every reader and writer (gguf-py's Keys)."""

    FORMAT = "format"
    FORMAT_VERSION = "format_version"
    CREATED = "created"
    UPDATED = "updated"
    CXRLITE_VERSION = "cxrlite_version"
    MODEL = "model"
    PREPROCESSING = "preprocessing"
    PROMPT = "prompt"
    TOKENIZER = "tokenizer"
    SOURCE = "source"
    # Where a published model came from (name, licence, the sha256 of every source file); only
    # bundles made by `cxrlite import` have it.
    PROVENANCE = "provenance"
    FILES = "files"
    VISION = "vision"
    LLM = "llm"
    QUALITY = "quality"
    DEFAULT = "default"


class VariantKey:
    """Keys of one variant's manifest entry."""

    FILE = "file"  # a file, or a folder of listed files (a GPTQ checkpoint)
    KIND = "kind"  # a Kind
    DTYPE = "dtype"
    SIZE = "size"
    PARITY = "parity"  # how the variant compares with its reference, as measured at build
    ENGINE = "engine"  # a TensorRT engine's build metadata (GPU, TensorRT version, profile)


class Kind:
    """What runs a variant's file."""

    ONNX = "onnx"
    TENSORRT = "tensorrt"
    GGUF = "gguf"
    GPTQ = "gptq"


VARIANT_SECTIONS = (Key.VISION, Key.LLM)
MERGED_SECTIONS = (*VARIANT_SECTIONS, Key.QUALITY, Key.DEFAULT)

# The vision graph's interface (ONNX input/output names; TensorRT engines keep them).
VISION_INPUT, VISION_OUTPUT = "pixels", "image_embeds"


class BundleError(CxrliteError, ValueError):
    """A bundle is missing, partial, of another format, tampered with or inconsistent."""


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_SIZE, _SHA256 = "size", "sha256"  # the keys of a files entry


def file_record(path: Path) -> dict[str, Any]:
    return {_SIZE: path.stat().st_size, _SHA256: sha256_file(path)}


def inventory(root: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {size, sha256}} of every file under root but the manifest."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_FILE and not rel.startswith(STAGING_PREFIX):
            files[rel] = file_record(path)
    return files


def safe_rel(rel: Any, where: Path) -> str:
    """A manifest path must stay inside the bundle (a hand-edited "../x" must not be read)."""
    parts = PurePosixPath(rel).parts if isinstance(rel, str) else ()
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise BundleError(f"{where}: manifest names an unsafe path {rel!r}")
    return rel


@dataclass(frozen=True)
class Variant:
    """One deployable form of the vision tower or the LLM, as the manifest lists it."""

    section: str  # Key.VISION or Key.LLM
    name: str  # e.g. "onnx-fp16", "gguf-q4_k_m", "gptq-4bit"
    entry: dict[str, Any]  # the whole manifest entry, for fields only some kinds carry

    @property
    def file(self) -> str:
        return self.entry[VariantKey.FILE]

    @property
    def kind(self) -> str | None:
        return self.entry.get(VariantKey.KIND)

    @property
    def dtype(self) -> str | None:
        return self.entry.get(VariantKey.DTYPE)

    @property
    def parity(self) -> dict[str, Any] | None:
        return self.entry.get(VariantKey.PARITY)

    @property
    def engine(self) -> dict[str, Any]:
        return self.entry.get(VariantKey.ENGINE) or {}


def variant_entry(file: str, kind: str, dtype: str | None, size: int, **fields: Any) -> dict:
    """A manifest entry for a variant whose `file` (bundle-relative) a writer just produced;
    `fields` adds what its kind carries (VariantKey.PARITY, VariantKey.ENGINE, ...)."""
    entry = {VariantKey.FILE: file, VariantKey.KIND: kind, VariantKey.DTYPE: dtype}
    return {**entry, VariantKey.SIZE: size, **fields}


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    def file(self, rel: str) -> Path:
        """The path of a listed file, or of a folder holding listed files (a GPTQ checkpoint)."""
        if not listed(self.manifest[Key.FILES], rel):
            raise BundleError(f"{self.path}: {rel!r} is not listed in {MANIFEST_FILE}")
        return self.path / rel

    def variants(self, section: str) -> dict[str, Variant]:
        return {name: Variant(section, name, e) for name, e in self.manifest[section].items()}

    @property
    def vision_variants(self) -> dict[str, Variant]:
        return self.variants(Key.VISION)

    @property
    def llm_variants(self) -> dict[str, Variant]:
        return self.variants(Key.LLM)

    def variant(self, section: str, name: str) -> Variant:
        variants = self.variants(section)
        if name not in variants:
            raise BundleError(
                f"{self.path}: no {section} variant {name!r}; have {sorted(variants)}"
            )
        return variants[name]

    def variant_file(self, section: str, name: str) -> Path:
        return self.file(self.variant(section, name).file)

    def variant_bytes(self, section: str, name: str) -> int:
        """Bytes on disk of a variant: its file, a folder's files and sidecars (x.onnx.data)."""
        file = self.variant(section, name).file
        files = self.manifest[Key.FILES]
        return sum(record[_SIZE] for rel, record in files.items() if owns(file, rel))

    @property
    def default(self) -> dict[str, str | None]:
        return self.manifest[Key.DEFAULT]

    @property
    def quality(self) -> dict[str, Any]:
        return self.manifest[Key.QUALITY]

    @property
    def source(self) -> dict[str, Any]:
        return self.manifest.get(Key.SOURCE) or {}

    @property
    def provenance(self) -> dict[str, Any] | None:
        return self.manifest.get(Key.PROVENANCE)

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest[Key.MODEL])

    @property
    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.manifest[Key.PREPROCESSING])

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.manifest[Key.TOKENIZER]["dir"]


def owns(variant_file: str, rel: str) -> bool:
    """A variant owns its file, the files under it (a folder) and its sidecars (x.onnx.data)."""
    return rel == variant_file or rel.startswith((variant_file + "/", variant_file + "."))


def listed(files: dict[str, Any], rel: str) -> bool:
    return rel in files or any(f.startswith(rel.rstrip("/") + "/") for f in files)


# --- manifest checks and loading -----------------------------------------------------------------


def validate_manifest(manifest: Any, where: Path) -> None:
    """Raise BundleError unless `manifest` is a bundle manifest this version can read."""
    if not isinstance(manifest, dict) or manifest.get(Key.FORMAT) != BUNDLE_FORMAT:
        found = manifest.get(Key.FORMAT) if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{where}: unknown format {found!r}; expected {BUNDLE_FORMAT!r}")
    version = manifest.get(Key.FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{where}: invalid format_version {version!r}")
    if version > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format_version {version} is newer than this cxrlite reads "
            f"({BUNDLE_FORMAT_VERSION}); upgrade cxrlite"
        )
    required = (Key.MODEL, Key.PREPROCESSING, Key.TOKENIZER, Key.FILES, *MERGED_SECTIONS)
    missing = [key for key in required if not isinstance(manifest.get(key), dict)]
    if missing:
        raise BundleError(f"{where}: manifest lacks {missing}")
    try:
        cfg = ModelConfig.from_dict(manifest[Key.MODEL])
        PreprocessConfig.from_dict(manifest[Key.PREPROCESSING])
    except (TypeError, ValueError) as e:
        raise BundleError(f"{where}: config does not validate ({e})") from None
    if cfg.preprocess != manifest[Key.PREPROCESSING]:
        raise BundleError(f"{where}: preprocessing differs from the model config's")
    for rel, record in manifest[Key.FILES].items():
        safe_rel(rel, where)
        if not (
            isinstance(record, dict)
            and isinstance(record.get(_SIZE), int)
            and isinstance(record.get(_SHA256), str)
            and len(record[_SHA256]) == 64
        ):
            raise BundleError(f"{where}: bad files entry for {rel!r}")
    for section in VARIANT_SECTIONS:
        for name, entry in manifest[section].items():
            rel = entry.get(VariantKey.FILE) if isinstance(entry, dict) else None
            if not listed(manifest[Key.FILES], safe_rel(rel, where)):
                raise BundleError(f"{where}: {section} variant {name!r} names unlisted {rel!r}")
    for section, name in manifest[Key.DEFAULT].items():
        if name is not None and name not in manifest.get(section, {}):
            raise BundleError(f"{where}: default {section} variant {name!r} does not exist")


def _verify_files(root: Path, files: dict[str, dict[str, Any]], mode: str) -> None:
    for rel, record in files.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{root}: {rel} is missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != record[_SIZE]:
            raise BundleError(
                f"{root}: {rel} is {size} bytes, the manifest says {record[_SIZE]}: "
                "modified or truncated; re-export the bundle"
            )
        if mode == "sha256" and sha256_file(path) != record[_SHA256]:
            raise BundleError(
                f"{root}: {rel} does not match its sha256 in the manifest: modified or "
                "corrupted; re-export the bundle"
            )


def load_bundle(path: str | os.PathLike, verify: bool | str = True) -> Bundle:
    """Open a bundle. verify: True/"sha256" (every listed file's size and sha256), "size"
    (sizes only: fast for multi-GB bundles) or False (manifest only)."""
    mode = {True: "sha256", False: "none"}.get(verify, verify)  # type: ignore[arg-type]
    if mode not in ("sha256", "size", "none"):
        raise ValueError(f"verify must be True, False, 'sha256' or 'size', got {verify!r}")
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root}: bundle folder not found")
    if root.name.startswith(STAGING_PREFIX):
        raise BundleError(f"{root}: the staging folder of an interrupted export, not a bundle")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(
            f"{root}: no {MANIFEST_FILE}; not a bundle, or a partial one (interrupted export)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BundleError(f"{manifest_path}: unreadable ({e})") from None
    validate_manifest(manifest, root)
    if mode != "none":
        _verify_files(root, manifest[Key.FILES], mode)
    return Bundle(root, manifest)
