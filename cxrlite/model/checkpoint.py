"""Checkpoint folders: save and load a CXRVLM (config.json, model.safetensors, tokenizer).

A checkpoint is an HF-style folder; `config.json` carries a format marker and version so a folder
of another kind is refused with a message instead of loading garbage. `load_vision_tower` reads
only the vision and bridger weights (exporting or serving the vision tower never loads the LLM).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrlite.errors import CxrliteError
from cxrlite.fileio import atomic_dir, write_json
from cxrlite.model.config import ModelConfig
from cxrlite.model.vlm import CXRVLM, VisionTower

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cxrlite-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# Written by cxrlite.model.llava into a LLaVA export: marks the folder as ours to replace.
LLAVA_MARKER_FILE = "cxrlite_export.json"


class CheckpointError(CxrliteError, ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or of another format."""


def is_ours(path: Path) -> bool:
    """A folder this module wrote (a checkpoint or a LLaVA export), which may be replaced."""
    if (path / LLAVA_MARKER_FILE).is_file():
        return True
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        return isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError):
        return False


def _tied(llm: nn.Module) -> bool:
    out, emb = llm.get_output_embeddings(), llm.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def _weights_for_saving(model: CXRVLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if _tied(model.llm):  # safetensors refuses shared storage; load() re-ties it
        state.pop("llm.lm_head.weight", None)
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def save(model: CXRVLM, tokenizer: Any, cfg: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write an HF-style checkpoint folder atomically: config.json, model.safetensors, tokenizer."""
    return save_state(_weights_for_saving(model), tokenizer, cfg, out_dir)


def save_state(
    state: dict[str, torch.Tensor], tokenizer: Any, cfg: ModelConfig, out_dir: str | os.PathLike
) -> Path:
    """A checkpoint folder from a state dict with CXRVLM's names (an importer's converted
    weights, never built into a model: a 7B model need not fit in memory twice)."""
    from safetensors.torch import save_file

    from cxrlite.model.tokenizer import save_tokenizer

    with atomic_dir(out_dir, is_ours) as tmp:
        write_json(
            tmp / CONFIG_FILE,
            {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict()},
        )
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_tokenizer(tokenizer, tmp)
    logger.info("saved checkpoint %s", out_dir)
    return Path(out_dir)


def load_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a cxrlite checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.pop("format", None) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: {CONFIG_FILE} is not a cxrlite checkpoint config")
    version = data.pop("format_version", None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported")
    try:
        return ModelConfig.from_dict(data)
    except ValueError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None


def load_weights(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(ckpt_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS_FILE}")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable ({e})") from None


def _no_init_weights() -> contextlib.AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


def load(
    ckpt_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[CXRVLM, Any, ModelConfig]:
    """(model in eval mode, tokenizer, config) from a folder written by `save`."""
    from cxrlite.model.tokenizer import load_tokenizer

    cfg = load_config(ckpt_dir)
    state = load_weights(ckpt_dir)
    # Every parameter is overwritten below; random init is slow at real sizes, so skip it.
    with _no_init_weights():
        model = CXRVLM(cfg, load_pretrained=False)
    if cfg.llm.tie_word_embeddings:
        model.llm.tie_weights()  # done by init_weights, which no_init_weights skips
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if not (k == "llm.lm_head.weight" and _tied(model.llm))
    ]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{ckpt_dir}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(ckpt_dir), cfg


def load_vision_tower(ckpt_dir: str | os.PathLike) -> VisionTower:
    """The fp32 CPU vision tower of a checkpoint, reading only its vision and bridger weights."""
    from safetensors import SafetensorError, safe_open

    cfg = load_config(ckpt_dir)
    weights = Path(ckpt_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS_FILE}")
    tower = VisionTower(cfg)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(("vision.", "bridger."))}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable ({e})") from None
    result = tower.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{ckpt_dir}: vision weights do not match the config (missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
        )
    return tower.float().eval()
