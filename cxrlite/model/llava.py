"""Export an MLP-bridger checkpoint as transformers' LlavaForConditionalGeneration folder."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cxrlite.fileio import atomic_dir, write_json
from cxrlite.model.checkpoint import (
    LLAVA_MARKER_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    is_ours,
    load_config,
    load_weights,
)
from cxrlite.model.language import hf_llm_config
from cxrlite.model.vision import hf_vision_config

logger = logging.getLogger(__name__)

# Our names -> the llava-hf checkpoint layout (language_model.model.*, vision_tower.vision_model.*):
# transformers 5 converts it on load (tested), older transformers and vLLM read it as it is.
LLAVA_RENAMES = (
    ("vision.", "vision_tower.vision_model."),
    ("bridger.", "multi_modal_projector."),
    ("llm.model.", "language_model.model."),
    ("llm.lm_head.", "language_model.lm_head."),
)


def _llava_name(name: str) -> str:
    for ours, theirs in LLAVA_RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise CheckpointError(f"no LLaVA name for weight {name!r}")


def export_llava(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an MLP-bridger checkpoint as transformers' LlavaForConditionalGeneration folder
    (config.json, model.safetensors, tokenizer) for transformers / vLLM users."""
    from safetensors.torch import save_file
    from transformers import LlavaConfig

    from cxrlite.model.tokenizer import load_tokenizer, save_tokenizer

    cfg = load_config(ckpt_dir)
    if cfg.bridger.kind != "mlp" or cfg.bridger.mlp_layers != 2:
        raise ValueError(
            f"LLaVA has a 2-layer MLP projector; {ckpt_dir} uses a {cfg.bridger.kind} bridger"
            + (f" of {cfg.bridger.mlp_layers} layers" if cfg.bridger.kind == "mlp" else "")
        )
    if cfg.image_token_id is None:
        raise CheckpointError(f"{ckpt_dir}: config has no image_token_id")
    llava_config = LlavaConfig(
        vision_config=hf_vision_config(cfg.vision).to_dict(),
        text_config=hf_llm_config(cfg.llm).to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.n_image_tokens,
        vision_feature_layer=cfg.vision.feature_layer,
        vision_feature_select_strategy=cfg.vision.select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.llm.tie_word_embeddings,
    )
    llava_config.architectures = ["LlavaForConditionalGeneration"]
    state = load_weights(ckpt_dir)
    tokenizer = load_tokenizer(ckpt_dir)
    with atomic_dir(out_dir, is_ours) as tmp:
        llava_config.save_pretrained(tmp)
        renamed = {_llava_name(name): tensor for name, tensor in state.items()}
        save_file(renamed, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_tokenizer(tokenizer, tmp)
        write_json(tmp / LLAVA_MARKER_FILE, {"format": "cxrlite-llava-export", "format_version": 1})
    logger.info("exported %s as LLaVA to %s", ckpt_dir, out_dir)
    return Path(out_dir)
