"""The vision encoder: a transformers ViT (SigLIP, CLIP or DINOv2; `VISION_FAMILIES`), random or
from a local folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrlite.model.config import VISION_FAMILIES, VisionConfig

logger = logging.getLogger(__name__)

# model_type in a folder's config.json -> our kind; full CLIP/SigLIP checkpoints hold a vision part.
_KIND_BY_MODEL_TYPE = {t: kind for kind, f in VISION_FAMILIES.items() for t in f.model_types}


def _transformers(name: str) -> Any:
    import transformers

    return getattr(transformers, name)


def hf_vision_config(cfg: VisionConfig) -> Any:
    """The transformers config of the family (SiglipVisionConfig, CLIPVisionConfig,
    Dinov2Config) for these shapes."""
    shapes = dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.num_channels,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
    )
    if cfg.layer_norm_eps is not None:
        shapes["layer_norm_eps"] = cfg.layer_norm_eps
    if cfg.hidden_act is not None:
        shapes["hidden_act"] = cfg.hidden_act
    if cfg.kind == "dinov2":  # the MLP width is a ratio of the hidden size there
        shapes["mlp_ratio"] = cfg.intermediate_size // cfg.hidden_size
    else:
        shapes["intermediate_size"] = cfg.intermediate_size
    if cfg.kind == "siglip":
        shapes["vision_use_head"] = cfg.use_head
    return _transformers(VISION_FAMILIES[cfg.kind].config_class)(**shapes)


def _read_folder_config(path: str | os.PathLike) -> dict[str, Any]:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a pretrained model folder (no config.json)")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: unreadable config ({e})") from None
    kind = _KIND_BY_MODEL_TYPE.get(data.get("model_type", ""))
    if kind is None:
        raise ValueError(
            f"{config_file}: model_type {data.get('model_type')!r} is not a vision model cxrlite "
            f"reads ({sorted(_KIND_BY_MODEL_TYPE)})"
        )
    if data["model_type"] in ("siglip", "clip"):
        data = {**data.get("vision_config", {}), "model_type": data["model_type"] + "_vision_model"}
    data["kind"] = kind
    return data


def vision_config_from_pretrained(path: str | os.PathLike, feature_layer: int = -2) -> VisionConfig:
    """A VisionConfig with the shapes of the ViT saved in a local folder."""
    data = _read_folder_config(path)
    hf_cls = _transformers(VISION_FAMILIES[data["kind"]].config_class)
    # Fill in transformers' defaults for fields the file leaves out.
    hf = hf_cls(
        **{k: v for k, v in data.items() if k not in ("kind", "model_type", "architectures")}
    )
    intermediate = getattr(hf, "intermediate_size", None) or int(hf.hidden_size * hf.mlp_ratio)
    return VisionConfig(
        kind=data["kind"],
        image_size=int(hf.image_size),
        patch_size=int(hf.patch_size),
        num_channels=int(hf.num_channels),
        hidden_size=int(hf.hidden_size),
        num_layers=int(hf.num_hidden_layers),
        num_heads=int(hf.num_attention_heads),
        intermediate_size=int(intermediate),
        feature_layer=feature_layer,
        use_head=bool(getattr(hf, "vision_use_head", False)) if data["kind"] == "siglip" else False,
        hidden_act=str(hf.hidden_act),
        layer_norm_eps=float(hf.layer_norm_eps),
        pretrained=str(path),
    )


def build_vision(cfg: VisionConfig, load_pretrained: bool = True) -> nn.Module:
    """The family's transformers model: loaded from `cfg.pretrained` (a local folder) when set
    and `load_pretrained`, otherwise randomly initialised with cfg's shapes."""
    model_cls = _transformers(VISION_FAMILIES[cfg.kind].model_class)
    if cfg.pretrained and load_pretrained:
        expected = vision_config_from_pretrained(cfg.pretrained, cfg.feature_layer)
        if expected.__dict__ != cfg.__dict__:
            raise ValueError(
                f"{cfg.pretrained}: the saved vision model's shapes differ from the config; "
                "build the config with vision_config_from_pretrained()"
            )
        logger.info("loading the vision encoder from %s", cfg.pretrained)
        model = model_cls.from_pretrained(
            cfg.pretrained, local_files_only=True, dtype=torch.float32
        )
    else:
        model = model_cls(hf_vision_config(cfg))
    return model


def select_features(vision: nn.Module, outputs: Any, cfg: VisionConfig) -> torch.Tensor:
    """The patch features a projector reads: hidden state `cfg.feature_layer` of the `vision`
    model's `outputs`, through its final LayerNorm when `cfg.feature_norm`, without the CLS token
    ("default" strategy; SigLIP has none: "full")."""
    features = outputs.hidden_states[cfg.feature_layer]
    if cfg.feature_norm:
        features = vision.get_submodule(VISION_FAMILIES[cfg.kind].final_norm)(features)
    if cfg.select_strategy == "default":
        features = features[:, 1:]
    return features
