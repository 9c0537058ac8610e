"""The vision encoder: transformers' SigLIP or CLIP vision tower, random or from a local folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrlite.model.config import VisionConfig

logger = logging.getLogger(__name__)

# model_type in a folder's config.json -> our kind; full CLIP/SigLIP checkpoints hold a vision part.
_KIND_BY_MODEL_TYPE = {
    "siglip_vision_model": "siglip",
    "siglip": "siglip",
    "clip_vision_model": "clip",
    "clip": "clip",
}


def hf_vision_config(cfg: VisionConfig) -> Any:
    """The transformers config (SiglipVisionConfig / CLIPVisionConfig) for these shapes."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    shapes = dict(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_channels=cfg.num_channels,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
    )
    if cfg.layer_norm_eps is not None:
        shapes["layer_norm_eps"] = cfg.layer_norm_eps
    if cfg.hidden_act is not None:
        shapes["hidden_act"] = cfg.hidden_act
    if cfg.kind == "clip":
        return CLIPVisionConfig(**shapes)
    return SiglipVisionConfig(vision_use_head=cfg.use_head, **shapes)


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
            f"{config_file}: model_type {data.get('model_type')!r} is not a SigLIP or CLIP vision model"
        )
    if data["model_type"] in ("siglip", "clip"):
        data = {**data.get("vision_config", {}), "model_type": data["model_type"] + "_vision_model"}
    data["kind"] = kind
    return data


def vision_config_from_pretrained(path: str | os.PathLike, feature_layer: int = -2) -> VisionConfig:
    """A VisionConfig with the shapes of the SigLIP/CLIP model saved in a local folder."""
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    data = _read_folder_config(path)
    hf_cls = CLIPVisionConfig if data["kind"] == "clip" else SiglipVisionConfig
    # Fill in transformers' defaults for fields the file leaves out.
    hf = hf_cls(
        **{k: v for k, v in data.items() if k not in ("kind", "model_type", "architectures")}
    )
    return VisionConfig(
        kind=data["kind"],
        image_size=int(hf.image_size),
        patch_size=int(hf.patch_size),
        num_channels=int(hf.num_channels),
        hidden_size=int(hf.hidden_size),
        num_layers=int(hf.num_hidden_layers),
        num_heads=int(hf.num_attention_heads),
        intermediate_size=int(hf.intermediate_size),
        feature_layer=feature_layer,
        use_head=bool(getattr(hf, "vision_use_head", False)) if data["kind"] == "siglip" else False,
        hidden_act=str(hf.hidden_act),
        layer_norm_eps=float(hf.layer_norm_eps),
        pretrained=str(path),
    )


def build_vision(cfg: VisionConfig, load_pretrained: bool = True) -> nn.Module:
    """SiglipVisionModel / CLIPVisionModel: loaded from `cfg.pretrained` (a local folder) when set
    and `load_pretrained`, otherwise randomly initialised with cfg's shapes."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    model_cls = CLIPVisionModel if cfg.kind == "clip" else SiglipVisionModel
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


def select_features(outputs: Any, cfg: VisionConfig) -> torch.Tensor:
    """The patch features LLaVA feeds its projector: hidden state `cfg.feature_layer`, without
    CLIP's CLS token ("default" strategy); SigLIP has no CLS ("full")."""
    features = outputs.hidden_states[cfg.feature_layer]
    if cfg.select_strategy == "default":
        features = features[:, 1:]
    return features
