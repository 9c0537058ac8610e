"""What every importer shares: reading the published files safely, the licence gate, provenance,
and writing the converted model as a cxrlite checkpoint and then a bundle.

An import is atomic like an export: the checkpoint is written under a staging name and the bundle
in its staging folder; a failure removes both, so nothing is left at `--out`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrlite.bundle import Bundle, sha256_file
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)


class PublishedModelError(CxrliteError, ValueError):
    """A published checkpoint is missing a file, holds something unexpected, or its parts do not
    fit together; the message names the file and the problem."""


@dataclass(frozen=True)
class License:
    name: str
    restriction: str


def require_license(model: str, license: License, accepted: bool) -> None:
    """Refuse unless the user accepted the model's licence (`--accept-license`)."""
    if not accepted:
        raise PublishedModelError(
            f"{model} is under the {license.name}: {license.restriction}. Read it, then pass "
            "--accept-license to import"
        )
    logger.warning("%s: %s (%s)", model, license.name, license.restriction)


def require_files(folder: Path, names: Iterable[str], what: str) -> None:
    if not folder.is_dir():
        raise PublishedModelError(f"{folder}: not a folder ({what})")
    for name in names:
        if not (folder / name).is_file():
            raise PublishedModelError(f"{folder}: no {name} (expected in the {what})")


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PublishedModelError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise PublishedModelError(f"{path}: expected a JSON object")
    return data


def expect(path: Path, field: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise PublishedModelError(f"{path}: {field} is {value!r}; this importer reads {allowed}")


def load_pickle(path: Path) -> Any:
    """A torch pickle, loaded with weights_only=True: tensors, containers and plain values only,
    so a pickle that would run code is refused instead of executed."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError) as e:
        raise PublishedModelError(f"{path}: unreadable ({e})") from None
    except Exception as e:  # pickle.UnpicklingError and whatever a crafted file raises
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PublishedModelError(
            f"{path}: holds something other than tensors, refused ({first})"
        ) from None


def tensor_dict(data: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise PublishedModelError(f"{path}: expected a dict of {what} tensors")
    return data


def load_llama_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A transformers LlamaForCausalLM folder's weights: safetensors or pytorch_model*.bin, one
    file or shards with an index."""
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", lambda p: load_file(str(p))),
        ("pytorch_model.bin.index.json", lambda p: tensor_dict(load_pickle(p), p, "weight")),
    ):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            if not shards:
                raise PublishedModelError(f"{index}: empty weight_map")
            require_files(folder, shards, "model folder (named by its index)")
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(loader(folder / shard))
            return state
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        path = folder / "pytorch_model.bin"
        return tensor_dict(load_pickle(path), path, "weight")
    raise PublishedModelError(f"{folder}: no model.safetensors or pytorch_model*.bin weights")


def load_safetensors_folder(src: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model.safetensors, or of the shards its index names."""
    from safetensors.torch import load_file

    index = src / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        require_files(src, shards, f"{what} (named by {index.name})")
    elif (src / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise PublishedModelError(f"{src}: no model.safetensors or model.safetensors.index.json")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            state.update(load_file(str(src / shard)))
        except Exception as e:  # safetensors raises its own SafetensorError
            raise PublishedModelError(f"{src / shard}: unreadable safetensors ({e})") from None
    return state


def folder_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file in a source folder (provenance: which exact files a bundle came from)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def provenance(
    model: str, license: License, revision: str | None, sources: dict[str, tuple[Path, dict]]
) -> dict[str, Any]:
    """The manifest's record of a published model's origin: name, licence, the revision the user
    gave, and per source folder its path and the sha256 of every file read from it."""
    return {
        "model": model,
        "license": license.name,
        "restriction": license.restriction,
        "revision": revision,
        "sources": {
            role: {"path": str(path.resolve()), "sha256": hashes}
            for role, (path, hashes) in sources.items()
        },
    }


def check_shapes(state: dict[str, torch.Tensor], expected: dict[str, tuple], where: Path) -> None:
    """Every expected key present with its shape, and no other key."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise PublishedModelError(
            f"{where}: the weights do not match the configuration (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise PublishedModelError(
                f"{where}: {key} is {tuple(state[key].shape)}, expected {tuple(shape)}"
            )


def expected_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Every weight of a CXRVLM with `cfg` and its shape, from a model on the meta device."""
    from cxrlite.model.vlm import CXRVLM

    with torch.device("meta"):
        model = CXRVLM(cfg, load_pretrained=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_bundle(
    state: dict[str, torch.Tensor],
    tokenizer: Any,
    cfg: Any,
    *,
    out: Path,
    checkpoint_out: str | os.PathLike | None,
    record: dict[str, Any],
    overwrite: bool = False,
) -> Bundle:
    """The converted weights as a cxrlite checkpoint at `checkpoint_out` (None: `<out>-checkpoint`;
    the PyTorch reference that eval, the quality gate and GPTQ need), then a bundle at `out` exported from it: ONNX
    vision tower, GGUF f16 LLM, parity figures, and `record` as its provenance. On any failure
    neither is left behind (unless the checkpoint was there before). `state` is emptied once
    saved, so its tensors (a 7B LLM's) are not held while the export loads the checkpoint again."""
    from cxrlite.export.bundle import export_bundle
    from cxrlite.export.gguf_builder import gguf_builder
    from cxrlite.model.checkpoint import save_state

    checkpoint_out = Path(checkpoint_out) if checkpoint_out else default_checkpoint_out(out)
    existed = checkpoint_out.exists()
    save_state(state, tokenizer, cfg, checkpoint_out)
    state.clear()  # the caller's dict too: the one reference to the converted tensors
    try:
        return export_bundle(
            checkpoint_out,
            out,
            extra_builders=[gguf_builder(checkpoint_out, "f16")],
            overwrite=overwrite,
            provenance=record,
        )
    except BaseException:
        if not existed:
            shutil.rmtree(checkpoint_out, ignore_errors=True)
        raise


def default_checkpoint_out(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + "-checkpoint")
