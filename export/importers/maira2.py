"""MAIRA-2 (microsoft/maira-2), read as published, into a bundle; its remote code never runs.

The folder is transformers' LLaVA layout with MAIRA-2's changes, which this follows:
- config.json (model_type "maira2"): text_config (Llama: Vicuna-7B with 207 added tokens and
  linear RoPE scaling), vision_config (Dinov2 used as a backbone, RAD-DINO), projector_n_layers
  (4), vision_feature_layer -1 (the backbone's last stage, its final LayerNorm applied) with
  the "default" strategy (CLS dropped), image_token_index. Fields equal to transformers'
  defaults may be left out, so they are read through transformers' own config classes.
- model*.safetensors (+ index): `language_model.*`, `vision_tower.*` (transformers 4's Dinov2
  names), `multi_modal_projector.layers.{0,2,4,6}`.
- preprocessor_config.json: BitImageProcessor (shortest edge, bicubic, centre crop, mean/std);
  MAIRA-2's processor first stretches each image's min..max to 0..255.
- tokenizer files and chat_template.json: the prompt is the model's own template, the image
  placed inside the user's text ("Given the current frontal image only<image> Provide ...").
Supported: the findings of a frontal image (MAIRA-2's reporting task without prior, lateral or
grounding). It writes findings only; there is no impression task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cxrlite.bundle import Bundle
from cxrlite.export.importers import vit_keys
from cxrlite.export.importers.common import (
    License,
    PublishedModelError,
    check_shapes,
    expect,
    expected_shapes,
    folder_hashes,
    load_safetensors_folder,
    provenance,
    read_json,
    require_files,
    require_license,
    write_bundle,
)
from cxrlite.imaging.preprocess import PreprocessConfig
from cxrlite.model.config import BridgerConfig, ModelConfig, VisionConfig

NAME = "MAIRA-2"
LICENSE = License(
    "Microsoft Research License Agreement (MSRLA)",
    "research use only: no clinical use, no redistribution of the weights",
)
FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json")
# MAIRA-2's findings request for a frontal image alone, no prior report or indication
FINDINGS_PROMPT = (
    "Given the current frontal image only<image> Provide a description of the findings in the "
    "radiology study in comparison to the prior frontal image. INDICATION: N/A TECHNIQUE: N/A "
    "COMPARISON: N/A"
)
BICUBIC = 3  # PIL's resample code in preprocessor_config.json


def _hf_configs(config: dict[str, Any], path: Path) -> tuple[Any, Any]:
    """text_config and vision_config with transformers' defaults filled in, as MAIRA-2's own
    config class builds them."""
    from transformers import Dinov2Config, LlamaConfig

    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise PublishedModelError(f"{path}: needs text_config and vision_config objects")
    expect(path, "text_config.model_type", text.get("model_type", "llama"), ["llama"])
    expect(path, "vision_config.model_type", vision.get("model_type"), ["dinov2"])
    drop = ("model_type", "architectures", "_name_or_path", "transformers_version")
    try:
        return (
            LlamaConfig(**{k: v for k, v in text.items() if k not in drop}),
            Dinov2Config(**{k: v for k, v in vision.items() if k not in drop}),
        )
    except (TypeError, ValueError) as e:
        raise PublishedModelError(
            f"{path}: text_config or vision_config is invalid ({e})"
        ) from None


def _check(config: dict[str, Any], vision: Any, path: Path) -> None:
    expect(path, "model_type", config.get("model_type"), ["maira2"])
    expect(path, "vision_feature_layer", config.get("vision_feature_layer"), [-1])
    expect(
        path,
        "vision_feature_select_strategy",
        config.get("vision_feature_select_strategy"),
        ["default"],
    )
    expect(path, "projector_hidden_act", config.get("projector_hidden_act", "gelu"), ["gelu"])
    expect(path, "multimodal_projector_bias", config.get("multimodal_projector_bias", True), [True])
    # MAIRA-2 reads the backbone's last stage as a token sequence, through its final LayerNorm
    expect(path, "vision_config.reshape_hidden_states", vision.reshape_hidden_states, [False])
    expect(path, "vision_config.apply_layernorm", vision.apply_layernorm, [True])
    last = f"stage{vision.num_hidden_layers}"
    expect(path, "vision_config.out_features", list(vision.out_features or [last]), [[last]])
    expect(path, "vision_config.use_swiglu_ffn", vision.use_swiglu_ffn, [False])
    if getattr(vision, "num_register_tokens", 0):
        raise PublishedModelError(f"{path}: a Dinov2 with register tokens is not supported")


def _convert(state: dict[str, torch.Tensor], n_layers: int, src: Path) -> dict[str, torch.Tensor]:
    """Published names -> ours: llm.*, vision.* (transformers 5 Dinov2), bridger.linear_N."""
    projector = {f"multi_modal_projector.layers.{2 * (n - 1)}.{p}": f"bridger.linear_{n}.{p}"
                 for n in range(1, n_layers + 1) for p in ("weight", "bias")}  # fmt: skip
    out, vision, unknown = {}, {}, []
    for key, tensor in state.items():
        if key.startswith("language_model."):
            out["llm." + key.removeprefix("language_model.")] = tensor
        elif key.startswith("vision_tower."):
            vision[key.removeprefix("vision_tower.")] = tensor
        elif key in projector:
            out[projector[key]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise PublishedModelError(f"{src}: unexpected weights {sorted(unknown)[:4]}")
    out.update({f"vision.{k}": v for k, v in vit_keys.hf4_to_ours(vision).items()})
    return out


def _model_config(src: Path, config: dict[str, Any]) -> ModelConfig:
    from cxrlite.model.language import llm_config_from_hf

    path = src / "config.json"
    text, hf_vision = _hf_configs(config, path)
    _check(config, hf_vision, path)
    try:
        llm = llm_config_from_hf(text, path)
    except ValueError as e:
        raise PublishedModelError(str(e)) from None
    vision = VisionConfig(
        kind="dinov2", image_size=hf_vision.image_size, patch_size=hf_vision.patch_size,
        num_channels=hf_vision.num_channels, hidden_size=hf_vision.hidden_size,
        num_layers=hf_vision.num_hidden_layers, num_heads=hf_vision.num_attention_heads,
        intermediate_size=int(hf_vision.hidden_size * hf_vision.mlp_ratio),
        feature_layer=-1, feature_norm=True, hidden_act=hf_vision.hidden_act,
        layer_norm_eps=hf_vision.layer_norm_eps,
    )  # fmt: skip
    image_id = config.get("image_token_index")
    if not isinstance(image_id, int):
        raise PublishedModelError(f"{path}: no image_token_index")
    return ModelConfig(
        vision=vision,
        bridger=BridgerConfig(kind="mlp", mlp_layers=int(config.get("projector_n_layers", 4))),
        llm=llm,
        preprocess=_preprocess(src / "preprocessor_config.json", vision).to_dict(),
        image_token_id=image_id,
        prompt_template="own",
        prompt_encoding="tokenizer",
        report_prompts={"findings": FINDINGS_PROMPT, "impression": None},
    )


def _preprocess(path: Path, vision: VisionConfig) -> PreprocessConfig:
    spec = read_json(path)
    expect(path, "image_processor_type", spec.get("image_processor_type"), ["BitImageProcessor"])
    expect(path, "resample", spec.get("resample"), [BICUBIC])
    for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        expect(path, flag, spec.get(flag), [True])
    size = (spec.get("size") or {}).get("shortest_edge")
    crop = spec.get("crop_size") or {}
    if size != vision.image_size or (crop.get("height"), crop.get("width")) != (size, size):
        raise PublishedModelError(
            f"{path}: resize to {size}, crop {crop}; the vision tower takes {vision.image_size} px"
        )
    return PreprocessConfig(
        image_size=size, channels=vision.num_channels, mean=tuple(spec["image_mean"]),
        std=tuple(spec["image_std"]), resize="crop", interpolation="bicubic",
        minmax=True,  # MAIRA-2's processor stretches every image to its own full range first
    )  # fmt: skip


def _tokenizer(src: Path, cfg: ModelConfig) -> Any:
    from cxrlite.model.tokenizer import TokenizerError, load_tokenizer, with_template

    try:
        tokenizer = load_tokenizer(src)
    except TokenizerError as e:
        raise PublishedModelError(str(e)) from None
    template = src / "chat_template.json"
    if not getattr(tokenizer, "chat_template", None) and template.is_file():
        tokenizer.chat_template = read_json(template).get("chat_template")
    if tokenizer.convert_tokens_to_ids(cfg.image_token) != cfg.image_token_id:
        raise PublishedModelError(
            f"{src}: the tokenizer's {cfg.image_token} is not image_token_index "
            f"{cfg.image_token_id} (config.json)"
        )
    try:
        return with_template(tokenizer, cfg)
    except TokenizerError as e:
        raise PublishedModelError(f"{src}: {e} (chat_template.json)") from None


def import_maira2(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    accept_license: bool = False,
    checkpoint_out: str | os.PathLike | None = None,
    revision: str | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Convert MAIRA-2 (`src`) into a bundle at `out`, and the cxrlite checkpoint it is
    exported from at `checkpoint_out` (default: `<out>-checkpoint`)."""
    src, out = Path(src), Path(out)
    require_license(NAME, LICENSE, accept_license)
    require_files(src, FILES, f"{NAME} folder")
    config = read_json(src / "config.json")
    cfg = _model_config(src, config)
    tokenizer = _tokenizer(src, cfg)
    state = _convert(load_safetensors_folder(src, f"{NAME} folder"), cfg.bridger.mlp_layers, src)
    state.setdefault("vision.embeddings.mask_token", torch.zeros(1, cfg.vision.hidden_size))
    check_shapes(state, expected_shapes(cfg), src)
    record = provenance(
        NAME, LICENSE, revision,
        {"model": (src, folder_hashes(src))},
    )  # fmt: skip
    record["task"] = "findings of a frontal image (no prior, lateral or grounding)"
    return write_bundle(
        state, tokenizer, cfg, out=out,
        checkpoint_out=checkpoint_out,
        record=record, overwrite=overwrite,
    )  # fmt: skip
