"""Write deployment bundles (the format and its reader: `cxrlite.bundle`).

Crash safety (one writer at a time):
- create_bundle builds everything in a `.tmp-<name>-*` folder beside the target, writes the
  manifest last and renames the folder into place, so an interrupted export leaves either no
  folder or a `.tmp-*` one, which load_bundle refuses.
- update_bundle writes new files under a staging folder inside the bundle, moves them in under
  names the current manifest does not list, and rewrites the manifest atomically last: a crash
  at any point leaves the previous manifest and every file it lists untouched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_FORMAT_VERSION,
    MANIFEST_FILE,
    MERGED_SECTIONS,
    STAGING_PREFIX,
    TOKENIZER_DIR,
    VARIANT_SECTIONS,
    VISION_INPUT,
    VISION_OUTPUT,
    Bundle,
    BundleError,
    Key,
    Kind,
    VariantKey,
    inventory,
    load_bundle,
    owns,
    sha256_file,
    validate_manifest,
    variant_entry,
)
from cxrlite.fileio import remove_stale_staging, staging_dir, write_json
from cxrlite.model.findings import FINDINGS_HEAD_FILE

logger = logging.getLogger(__name__)

_TOKENIZER_NAMES = ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja")

# A builder writes its files under the staging folder it is given and returns manifest parts:
# {"vision": {name: entry}, "llm": {...}, "quality": {...}, "default": {...}}; None deletes.
Builder = Callable[[Path], dict[str, Any] | None]


# --- building -----------------------------------------------------------------------------------


def _copy_tokenizer(ckpt_dir: Path, dest: Path) -> list[str]:
    names = sorted(
        p.name
        for p in ckpt_dir.iterdir()
        if p.is_file() and (p.name.startswith("tokenizer") or p.name in _TOKENIZER_NAMES)
    )
    if not names:
        raise BundleError(f"{ckpt_dir}: no tokenizer files in the checkpoint")
    dest.mkdir(parents=True)
    for name in names:
        shutil.copyfile(ckpt_dir / name, dest / name)
    return names


def _write_findings_head(weights: Path, dest: Path) -> None:
    """The checkpoint's findings head as the runtime reads it (cxrlite.model.findings)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from cxrlite.model.findings import BIAS, WEIGHT

    with safe_open(str(weights), framework="np") as f:
        head = {name: f.get_tensor(f"findings_head.linear.{name}") for name in (WEIGHT, BIAS)}
    save_file({k: v.astype(np.float32) for k, v in head.items()}, str(dest))


def _base_manifest(ckpt_dir: Path, staging: Path) -> dict[str, Any]:
    """Everything but the variants: configs, tokenizer (copied), prompt, provenance."""
    import cxrlite
    from cxrlite.model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config
    from cxrlite.model.tokenizer import load_tokenizer

    cfg = load_config(ckpt_dir)
    names = _copy_tokenizer(ckpt_dir, staging / TOKENIZER_DIR)
    if cfg.findings_head is not None:
        _write_findings_head(ckpt_dir / WEIGHTS_FILE, staging / FINDINGS_HEAD_FILE)
    tokenizer = load_tokenizer(staging / TOKENIZER_DIR)  # proves the copy loads
    return {
        Key.FORMAT: BUNDLE_FORMAT,
        Key.FORMAT_VERSION: BUNDLE_FORMAT_VERSION,
        Key.CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        Key.CXRLITE_VERSION: cxrlite.__version__,
        Key.MODEL: cfg.to_dict(),
        Key.PREPROCESSING: dict(cfg.preprocess),
        Key.PROMPT: {
            "template": cfg.prompt_template,
            "chat_template": tokenizer.chat_template,
            "image_token": cfg.image_token,
            "image_token_id": cfg.image_token_id,
            "n_image_tokens": cfg.n_image_tokens,
        },
        Key.TOKENIZER: {"dir": TOKENIZER_DIR, "files": names},
        Key.SOURCE: {
            "path": str(ckpt_dir.resolve()),
            "weights_sha256": sha256_file(ckpt_dir / WEIGHTS_FILE),
            "config": json.loads((ckpt_dir / CONFIG_FILE).read_text(encoding="utf-8")),
        },
        Key.VISION: {},
        Key.LLM: {},
        Key.QUALITY: {},
        Key.DEFAULT: {Key.VISION: None, Key.LLM: None},
    }


def _merge_parts(manifest: dict[str, Any], parts: dict[str, Any] | None, where: Path) -> None:
    if parts is None:
        return
    if not isinstance(parts, dict) or not all(isinstance(v, dict) for v in parts.values()):
        raise BundleError(f"{where}: a builder returned {parts!r}, not {{section: {{name: ...}}}}")
    unknown = sorted(set(parts) - set(MERGED_SECTIONS))
    if unknown:
        raise BundleError(f"{where}: a builder returned unknown manifest sections {unknown}")
    for section, entries in parts.items():
        for name, entry in entries.items():
            if entry is None:
                manifest[section].pop(name, None)
                if section in VARIANT_SECTIONS:
                    manifest[Key.QUALITY].pop(name, None)
            else:
                manifest[section][name] = entry


def _settle_defaults(manifest: dict[str, Any]) -> None:
    """A default that names no variant falls back to the first one left (or None)."""
    for section in VARIANT_SECTIONS:
        if manifest[Key.DEFAULT].get(section) not in manifest[section]:
            manifest[Key.DEFAULT][section] = next(iter(manifest[section]), None)


def _run_builders(
    builders: Iterable[Builder], staging: Path, manifest: dict[str, Any], where: Path
) -> None:
    for builder in builders:
        _merge_parts(manifest, builder(staging), where)


def _as_list(build: Builder | Sequence[Builder] | None) -> list[Builder]:
    if build is None:
        return []
    return [build] if callable(build) else list(build)


def create_bundle(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    build: Builder | Sequence[Builder] | None = None,
    *,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Bundle:
    """Build a bundle from a checkpoint: the base manifest, then each builder in turn, in a
    staging folder that replaces `out_dir` only once complete. `overwrite` replaces an existing
    bundle (never a folder that is not one); `provenance` records a published model's origin."""
    ckpt, out = Path(ckpt_dir), Path(out_dir)
    if out.exists():
        is_bundle = (out / MANIFEST_FILE).is_file()
        if not out.is_dir() or (any(out.iterdir()) and not is_bundle):
            raise BundleError(f"{out}: exists and is not a bundle; refusing to replace it")
        if is_bundle and not overwrite:
            raise BundleError(f"{out}: a bundle already exists (overwrite it explicitly)")
    for stale in remove_stale_staging(out.parent, f"{STAGING_PREFIX}{out.name}-"):
        logger.info("removed %s, left by an interrupted export", stale)
    staging = staging_dir(out.parent, f"{STAGING_PREFIX}{out.name}-")
    try:
        manifest = _base_manifest(ckpt, staging)
        if provenance is not None:
            manifest[Key.PROVENANCE] = provenance
        _run_builders(_as_list(build), staging, manifest, out)
        _settle_defaults(manifest)
        manifest[Key.FILES] = inventory(staging)
        validate_manifest(manifest, out)
        write_json(staging / MANIFEST_FILE, manifest)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote bundle %s (%d files)", out, len(manifest[Key.FILES]))
    return Bundle(out, manifest)


def _swap_into_place(staging: Path, out: Path) -> None:
    old = None
    if out.exists():
        # rename() cannot replace a non-empty folder: move the old one aside first.
        old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{out.name}-old-", dir=out.parent))
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- updating -------------------------------------------------------------------------------------


def _remove_unlisted(root: Path, files: dict[str, Any]) -> None:
    """Delete what the manifest does not list (leftovers of interrupted updates)."""
    for path in sorted(root.iterdir()):
        if path.name.startswith(STAGING_PREFIX) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    for path in sorted(root.rglob("*"), reverse=True):  # children before their folders
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel != MANIFEST_FILE and rel not in files:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _orphans(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """Files owned by a variant of `old` that no variant of `new` owns."""
    old_owners = [e[VariantKey.FILE] for s in VARIANT_SECTIONS for e in old[s].values()]
    new_owners = [e[VariantKey.FILE] for s in VARIANT_SECTIONS for e in new[s].values()]
    return {
        rel
        for rel in old[Key.FILES]
        if any(owns(p, rel) for p in old_owners) and not any(owns(p, rel) for p in new_owners)
    }


def _without_files(manifest: dict[str, Any], rels: set[str]) -> dict[str, Any]:
    """The manifest minus `rels`, the variants owning any of them and those variants' files."""
    out = json.loads(json.dumps(manifest))
    for section in VARIANT_SECTIONS:
        for name, entry in list(out[section].items()):
            if any(owns(entry[VariantKey.FILE], rel) for rel in rels):
                del out[section][name]
                out[Key.QUALITY].pop(name, None)
    dropped = rels | _orphans(manifest, out)
    out[Key.FILES] = {rel: rec for rel, rec in out[Key.FILES].items() if rel not in dropped}
    _settle_defaults(out)
    return out


def update_bundle(
    bundle_dir: str | os.PathLike, add: Builder, *, verify: bool | str = True
) -> Bundle:
    """Add (or, with None entries, remove) variants: `add(staging)` writes its files under the
    staging folder with their bundle-relative paths and returns manifest parts. A new file at a
    listed path with other content replaces it: the variants using the old file are first
    dropped from the manifest, so no manifest ever lists a file being rewritten."""
    bundle = load_bundle(bundle_dir, verify=verify)
    root, manifest = bundle.path, bundle.manifest
    _remove_unlisted(root, manifest[Key.FILES])
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}update-", dir=root))
    try:
        parts = add(staging)
        new_files = inventory(staging)
        updated = json.loads(json.dumps(manifest))
        _merge_parts(updated, parts, root)
        updated[Key.UPDATED] = datetime.now(UTC).isoformat(timespec="seconds")
        orphans = _orphans(manifest, updated) - set(new_files)
        kept = {rel: rec for rel, rec in manifest[Key.FILES].items() if rel not in orphans}
        updated[Key.FILES] = dict(sorted({**kept, **new_files}.items()))
        _settle_defaults(updated)
        validate_manifest(updated, root)  # before anything in the bundle changes
        replaced = {
            rel
            for rel, record in new_files.items()
            if rel in manifest[Key.FILES] and manifest[Key.FILES][rel] != record
        }
        if replaced:
            # The old content stops being part of the bundle before it is overwritten.
            write_json(root / MANIFEST_FILE, _without_files(manifest, replaced))
        for rel in new_files:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, root / rel)
        write_json(root / MANIFEST_FILE, updated)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_unlisted(root, updated[Key.FILES])
    logger.info("updated bundle %s", root)
    return Bundle(root, updated)


# --- the export ----------------------------------------------------------------------------------

VISION_DIR = "vision"


def _onnx_variant(
    path: Path, staging: Path, tower: Any, batches: list, providers: Sequence[Any]
) -> dict[str, Any]:
    from cxrlite.export.onnx import ParityError, validate_vision_onnx

    report = validate_vision_onnx(path, tower, batches, providers=providers)
    if report["passed"] is False:
        raise ParityError(
            f"{path.name} differs from PyTorch beyond its threshold {report['threshold']}: "
            f"max abs diff {report['max_abs_diff']:.3g}, relative error "
            f"{report['max_rel_error']:.3g}"
        )
    logger.info(
        "%s: max abs diff %.3g, relative error %.3g, mean cosine %.6f",
        path.name, report["max_abs_diff"], report["max_rel_error"], report["mean_cosine"],
    )  # fmt: skip
    rel = path.relative_to(staging).as_posix()
    return variant_entry(rel, Kind.ONNX, report["precision"], path.stat().st_size, parity=report)


def _torch_reference(tower: Any) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return tower.encode_image(torch.as_tensor(batch)).float().numpy()

    return run


def vision_builder(
    ckpt_dir: str | os.PathLike,
    *,
    fp16: bool = True,
    int8: bool = False,
    tensorrt: bool = False,
    validation_pixels: Any = None,
    providers: Sequence[Any] = ("CPUExecutionProvider",),
    max_batch: int = 8,
    timing_cache: str | os.PathLike | None = None,
) -> Builder:
    """A builder exporting the vision tower: onnx-fp32 (+ onnx-fp16, onnx-int8, tensorrt-*),
    each validated against PyTorch on `validation_pixels` ([N, C, H, W]; default: held-out
    phantoms); fp32/fp16/TensorRT over threshold raise ParityError, int8 is reported only."""
    from cxrlite.export import onnx as ox
    from cxrlite.model.checkpoint import load_vision_tower

    def build(staging: Path) -> dict[str, Any]:
        tower = load_vision_tower(ckpt_dir)
        pixels = ox.phantom_pixels(tower.cfg) if validation_pixels is None else validation_pixels
        batches = ox.split_batches(pixels)
        folder = staging / VISION_DIR
        fp32 = ox.export_vision_onnx(tower, folder / "vision-fp32.onnx")
        variants = {"onnx-fp32": _onnx_variant(fp32, staging, tower, batches, providers)}
        if fp16:
            path = ox.convert_onnx_fp16(fp32, folder / "vision-fp16.onnx")
            variants["onnx-fp16"] = _onnx_variant(path, staging, tower, batches, providers)
        if int8:
            path = ox.quantize_onnx_int8(fp32, folder / "vision-int8.onnx")
            variants["onnx-int8"] = _onnx_variant(path, staging, tower, batches, providers)
        if tensorrt:
            from cxrlite.export.tensorrt import engine_variant

            source = folder / ("vision-fp16.onnx" if fp16 else "vision-fp32.onnx")
            entry = engine_variant(
                source, staging, _torch_reference(tower), batches, fp16,
                max_batch=max_batch, timing_cache=timing_cache,
            )  # fmt: skip
            variants[f"tensorrt-{'fp16' if fp16 else 'fp32'}"] = entry
        # fp32 runs on every machine; runtimes may prefer another variant for their device.
        return {Key.VISION: variants, Key.DEFAULT: {Key.VISION: "onnx-fp32"}}

    return build


def export_bundle(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fp16: bool = True,
    int8: bool = False,
    tensorrt: bool = False,
    validation_pixels: Any = None,
    max_batch: int = 8,
    timing_cache: str | os.PathLike | None = None,
    extra_builders: Sequence[Builder] = (),
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
) -> Bundle:
    """Export a checkpoint to a bundle: the vision variants (see `vision_builder`), then each of
    `extra_builders` (the LLM's GGUF, ...), all in one staging folder renamed into place."""
    if tensorrt:  # fail before minutes of export, not after
        from cxrlite.runtime.tensorrt_runner import require_tensorrt

        require_tensorrt()
    builder = vision_builder(
        ckpt_dir,
        fp16=fp16,
        int8=int8,
        tensorrt=tensorrt,
        validation_pixels=validation_pixels,
        max_batch=max_batch,
        timing_cache=timing_cache,
    )
    return create_bundle(
        ckpt_dir, out_dir, [builder, *extra_builders], overwrite=overwrite, provenance=provenance
    )


def add_tensorrt_engine(
    bundle_dir: str | os.PathLike,
    *,
    max_batch: int = 8,
    timing_cache: str | os.PathLike | None = None,
    validation_pixels: Any = None,
) -> Bundle:
    """Build a TensorRT engine on this (serving) machine from the bundle's fp16 graph (else its
    fp32 one) and add it as a vision variant, checked against the bundle's validated fp32 graph.
    Engines only run on the GPU model and TensorRT version that built them, which is why this
    runs where the bundle is served rather than at export."""
    from cxrlite.export import onnx as ox
    from cxrlite.export.tensorrt import engine_variant
    from cxrlite.runtime.onnx_runner import onnx_session
    from cxrlite.runtime.tensorrt_runner import require_tensorrt

    require_tensorrt()
    bundle = load_bundle(bundle_dir)
    variants = bundle.vision_variants
    if "onnx-fp32" not in variants:
        raise BundleError(f"{bundle.path}: no onnx-fp32 vision variant to build from")
    fp16 = "onnx-fp16" in variants
    source = bundle.variant_file(Key.VISION, "onnx-fp16" if fp16 else "onnx-fp32")
    fp32 = onnx_session(bundle.variant_file(Key.VISION, "onnx-fp32"), ["CPUExecutionProvider"])
    pixels = ox.phantom_pixels(bundle.config) if validation_pixels is None else validation_pixels

    def reference(batch: np.ndarray) -> np.ndarray:
        return fp32.run([VISION_OUTPUT], {VISION_INPUT: batch})[0]

    def add(staging: Path) -> dict[str, Any]:
        entry = engine_variant(
            source, staging, reference, ox.split_batches(pixels), fp16,
            max_batch=max_batch, timing_cache=timing_cache,
        )  # fmt: skip
        entry[VariantKey.PARITY]["reference"] = "onnx-fp32"
        return {Key.VISION: {f"tensorrt-{'fp16' if fp16 else 'fp32'}": entry}}

    return update_bundle(bundle.path, add, verify=False)  # verified just above
