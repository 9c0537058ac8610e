"""LLaVA-Rad (microsoft/llava-rad + lmsys/vicuna-7b-v1.5), read as published, into a bundle.

What the published folder holds, and how LLaVA-Rad's own loader (llava/model/builder.py) puts it
together, which this follows:
- config.json: a LLaVA config (model_type "llava", mm_* fields); the LLM itself is the separate
  Vicuna folder (`--base`), whose tokenizer is LLaVA-Rad's too.
- adapter_config.json + adapter_model.bin: a PEFT LoRA on the LLM's linear layers, merged in.
- non_lora_trainables.bin: the projector, `base_model.model.model.mm_projector.{0,2}.*`, a
  Linear-GELU-Linear MLP (mlp2x_gelu).
- biomedclipcxr_518.json + its checkpoint: an open_clip model whose vision trunk is a timm
  DINOv2 ViT (`module.visual.trunk.*`); LLaVA-Rad reads the output of its second-to-last block
  (mm_vision_select_layer -2, the trunk's final norm not applied), CLS dropped.
- Inference: open_clip's preprocessing (RGB, bicubic shortest-edge resize, centre crop, OpenAI
  CLIP mean/std), the Vicuna v1 conversation, the prompt tokenized in chunks around the image.
  It writes findings only; there is no impression task.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
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
    load_llama_weights,
    load_pickle,
    provenance,
    read_json,
    require_files,
    require_license,
    tensor_dict,
    write_bundle,
)
from cxrlite.export.importers.lora import lora_scale, merge_lora
from cxrlite.imaging.preprocess import PreprocessConfig
from cxrlite.model.config import BridgerConfig, ModelConfig, VisionConfig

logger = logging.getLogger(__name__)

NAME = "LLaVA-Rad"
LICENSE = License(
    "Microsoft Research License Agreement (LLaVA-Rad) with the Llama 2 Community License (Vicuna)",
    "research use only: no clinical use, no redistribution of the weights",
)
MODEL_FILES = ("config.json", "adapter_config.json", "non_lora_trainables.bin")
VISION_JSON = "biomedclipcxr_518.json"
BASE_FILES = ("config.json", "tokenizer.model", "tokenizer_config.json")
# LLaVA-Rad's MIMIC-CXR findings question (llava/utils.py), without an indication
FINDINGS_PROMPT = "Provide a description of the findings in the radiology image."
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TIMM_DINOV2 = re.compile(r"^vit_(small|base|large|giant2)_patch14_dinov2(\.\w+)?$")
DINOV2_HEAD_WIDTH = 64  # every DINOv2 size has 64-wide attention heads
PROJECTOR_KEYS = {  # non_lora_trainables.bin name -> ours (bridger.*)
    f"base_model.model.model.mm_projector.{i}.{p}": f"linear_{n}.{p}"
    for i, n in ((0, 1), (2, 2))
    for p in ("weight", "bias")
}
LORA_PREFIX = "base_model.model."
TRUNK_PREFIXES = ("module.visual.trunk.", "visual.trunk.")


def _check_config(config: dict[str, Any], path: Path) -> None:
    expect(path, "model_type", config.get("model_type"), ["llava"])
    expect(path, "mm_projector_type", config.get("mm_projector_type"), ["mlp2x_gelu"])
    expect(path, "mm_vision_select_feature", config.get("mm_vision_select_feature"), ["patch"])
    expect(path, "mm_use_im_start_end", config.get("mm_use_im_start_end", False), [False])
    expect(path, "mm_use_im_patch_token", config.get("mm_use_im_patch_token", False), [False])
    layer = config.get("mm_vision_select_layer")
    if not isinstance(layer, int) or layer >= 0:
        raise PublishedModelError(f"{path}: mm_vision_select_layer {layer!r} is not a -N index")


def _vision(src: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], VisionConfig]:
    """The timm trunk as our Dinov2Model weights, and its VisionConfig."""
    spec_path = src / VISION_JSON
    vision_cfg = read_json(spec_path).get("vision_cfg") or {}
    timm_name = vision_cfg.get("timm_model_name")
    if not isinstance(timm_name, str) or not TIMM_DINOV2.match(timm_name):
        raise PublishedModelError(
            f"{spec_path}: timm model {timm_name!r} is not a DINOv2 ViT/14 (vit_*_patch14_dinov2)"
        )
    ckpt = (
        src
        / Path(config.get("mm_vision_tower_checkpoint") or "biomedclipcxr_518_checkpoint.pt").name
    )
    require_files(src, [ckpt.name], f"{NAME} folder (the vision tower)")
    data = load_pickle(ckpt)
    state = data.get("state_dict", data) if isinstance(data, dict) else data
    state = tensor_dict(state, ckpt, "open_clip")
    prefix = next((p for p in TRUNK_PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is None:
        raise PublishedModelError(
            f"{ckpt}: no vision trunk weights ({' or '.join(TRUNK_PREFIXES)}*)"
        )
    trunk = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        ours = vit_keys.timm_to_ours(trunk)
        shapes = vit_keys.dinov2_shapes(ours)
    except (KeyError, ValueError) as e:
        raise PublishedModelError(f"{ckpt}: not a timm DINOv2 trunk ({e})") from None
    if shapes["image_size"] != vision_cfg.get("image_size"):
        raise PublishedModelError(
            f"{spec_path}: image_size {vision_cfg.get('image_size')} but the weights' position "
            f"table is for {shapes['image_size']} px"
        )
    cfg = VisionConfig(
        kind="dinov2",
        num_heads=max(1, shapes["hidden_size"] // DINOV2_HEAD_WIDTH),
        feature_layer=config["mm_vision_select_layer"],
        feature_norm=False,  # LLaVA-Rad never applies the trunk's final norm
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        **shapes,
    )
    return {f"vision.{k}": v for k, v in ours.items()}, cfg


def _projector(path: Path) -> dict[str, torch.Tensor]:
    state = tensor_dict(load_pickle(path), path, "projector")
    if set(state) != set(PROJECTOR_KEYS):
        raise PublishedModelError(
            f"{path}: expected exactly {sorted(PROJECTOR_KEYS)}, found {sorted(state)[:4]}"
        )
    return {f"bridger.{ours}": state[theirs] for theirs, ours in PROJECTOR_KEYS.items()}


def _llm(src: Path, base: Path) -> dict[str, torch.Tensor]:
    """Vicuna's weights with LLaVA-Rad's LoRA merged in, under our `llm.` prefix."""
    weights = {k: v for k, v in load_llama_weights(base).items() if "rotary_emb" not in k}
    adapter_config = src / "adapter_config.json"
    scale = lora_scale(read_json(adapter_config), adapter_config)
    adapter_file = next(
        (
            src / n
            for n in ("adapter_model.safetensors", "adapter_model.bin")
            if (src / n).is_file()
        ),
        None,
    )
    if adapter_file is None:
        raise PublishedModelError(f"{src}: no adapter_model.bin (the LoRA of the LLM)")
    if adapter_file.suffix == ".safetensors":
        from safetensors.torch import load_file

        adapter = load_file(str(adapter_file))
    else:
        adapter = tensor_dict(load_pickle(adapter_file), adapter_file, "LoRA")
    n = merge_lora(weights, adapter, scale, prefix=LORA_PREFIX, where=adapter_file)
    logger.info("merged %d LoRA weights (scale %g)", n, scale)
    return {f"llm.{k}": v for k, v in weights.items()}


def _model_config(
    src: Path, base: Path, config: dict[str, Any], vision: VisionConfig
) -> ModelConfig:
    from cxrlite.model.language import llm_config_from_pretrained

    try:
        llm = dataclasses.replace(llm_config_from_pretrained(base), pretrained=None)
    except (OSError, ValueError) as e:
        raise PublishedModelError(f"{base}: not the base LLM ({e})") from None
    for field, ours in (("hidden_size", llm.hidden_size), ("vocab_size", llm.vocab_size)):
        if config.get(field, ours) != ours:
            raise PublishedModelError(
                f"{base}: {field} {ours} does not match {NAME}'s {config.get(field)} "
                "(config.json); pass the Vicuna-7B v1.5 folder as --base"
            )
    if config.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
        raise PublishedModelError(
            f"{src / 'config.json'}: mm_hidden_size {config['mm_hidden_size']} but the vision "
            f"tower is {vision.hidden_size} wide"
        )
    pre = PreprocessConfig(
        image_size=vision.image_size, channels=vision.num_channels, mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD, resize="crop", interpolation="bicubic",
    )  # fmt: skip
    return ModelConfig(
        vision=vision,
        bridger=BridgerConfig(kind="mlp", mlp_layers=2),
        llm=llm,
        preprocess=pre.to_dict(),
        image_token_id=llm.vocab_size,  # LLaVA's IMAGE_TOKEN_INDEX: never looked up
        prompt_template="vicuna-v1",
        prompt_encoding="chunks",
        report_prompts={"findings": FINDINGS_PROMPT, "impression": None},
    )


def _tokenizer(base: Path, cfg: ModelConfig) -> Any:
    from cxrlite.model.tokenizer import TokenizerError, load_tokenizer, with_template

    try:
        return with_template(load_tokenizer(base), cfg)
    except TokenizerError as e:
        raise PublishedModelError(str(e)) from None


def import_llava_rad(
    src: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    *,
    accept_license: bool = False,
    checkpoint_out: str | os.PathLike | None = None,
    revision: str | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Convert LLaVA-Rad (`src`) with its base LLM (`base`, Vicuna-7B v1.5) into a bundle at
    `out`, and the cxrlite checkpoint it is exported from at `checkpoint_out` (default:
    `<out>-checkpoint`)."""
    src, base, out = Path(src), Path(base), Path(out)
    require_license(NAME, LICENSE, accept_license)
    require_files(src, (*MODEL_FILES, VISION_JSON), f"{NAME} folder")
    require_files(base, BASE_FILES, "base LLM folder (Vicuna-7B v1.5)")
    config = read_json(src / "config.json")
    _check_config(config, src / "config.json")
    vision_state, vision_cfg = _vision(src, config)
    cfg = _model_config(src, base, config, vision_cfg)
    state = {**vision_state, **_projector(src / "non_lora_trainables.bin"), **_llm(src, base)}
    check_shapes(state, expected_shapes(cfg), src)
    record = provenance(
        NAME,
        LICENSE,
        revision,
        {
            "model": (src, folder_hashes(src)),
            "base": (base, folder_hashes(base)),
        },
    )
    return write_bundle(
        state,
        _tokenizer(base, cfg),
        cfg,
        out=out,
        checkpoint_out=checkpoint_out,
        record=record,
        overwrite=overwrite,
    )
