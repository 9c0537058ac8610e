"""The language model: a transformers decoder of a family in LLM_FAMILIES (LlamaForCausalLM,
Gemma3ForCausalLM), random or from a local pretrained folder (Llama)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrlite.model.config import GEMMA3_GLOBAL_EVERY, LLM_FAMILIES, LLMConfig

logger = logging.getLogger(__name__)

# Shape fields that must agree between a pretrained folder and the config (vocab may grow).
_SHAPE_FIELDS = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "tie_word_embeddings",
)


def gemma3_layer_types(n_layers: int) -> list[str]:
    """Gemma 3's attention per layer: every GEMMA3_GLOBAL_EVERY-th global, the rest sliding."""
    return [
        "full_attention" if (i + 1) % GEMMA3_GLOBAL_EVERY == 0 else "sliding_attention"
        for i in range(n_layers)
    ]


def hf_llm_config(cfg: LLMConfig) -> Any:
    """The transformers config of the family (LlamaConfig, Gemma3TextConfig) for these shapes."""
    import transformers

    rope = {**(cfg.rope_scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}
    shapes = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_size,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        attention_bias=False,
    )
    if cfg.arch == "gemma3":
        family = dict(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=cfg.head_size,
            sliding_window=cfg.sliding_window,
            layer_types=gemma3_layer_types(cfg.num_layers),
            rope_parameters={
                "full_attention": rope,
                "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
            },
        )
    else:
        family = dict(rope_parameters=rope, hidden_act="silu", mlp_bias=False)
    return getattr(transformers, LLM_FAMILIES[cfg.arch].config_class)(**shapes, **family)


def llm_config_from_pretrained(path: str | os.PathLike) -> LLMConfig:
    """An LLMConfig with the shapes of the Llama-family model saved in a local folder."""
    from transformers import LlamaConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a pretrained model folder (no config.json)")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: unreadable config ({e})") from None
    # Mistral without a sliding window is a Llama; with one, LlamaForCausalLM would ignore it.
    if data.get("model_type") not in ("llama", "mistral") or data.get("sliding_window"):
        raise ValueError(
            f"{config_file}: model_type {data.get('model_type')!r} is not a Llama-family LLM "
            "(Llama, Vicuna, or Mistral without a sliding window)"
        )
    hf = LlamaConfig.from_pretrained(str(path), local_files_only=True)
    return dataclasses.replace(llm_config_from_hf(hf, config_file), pretrained=str(path))


def llm_config_from_hf(hf: Any, where: Any) -> LLMConfig:
    """An LLMConfig from a transformers LlamaConfig (a folder's, or a multimodal config's
    text_config with transformers' defaults filled in); `where` names it in errors."""
    if hf.attention_bias or hf.mlp_bias or hf.head_dim != hf.hidden_size // hf.num_attention_heads:
        raise ValueError(f"{where}: biases or a custom head_dim are not supported")
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    theta = float(rope.pop("rope_theta", 10000.0))
    eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, list) else hf.eos_token_id
    return LLMConfig(
        arch="llama",
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
        intermediate_size=hf.intermediate_size,
        max_position_embeddings=hf.max_position_embeddings,
        rope_theta=theta,
        # e.g. Llama-3's "llama3" frequency scaling, which a rebuilt model must keep
        rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
        rms_norm_eps=hf.rms_norm_eps,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        bos_token_id=hf.bos_token_id,
        eos_token_id=eos,
        pad_token_id=hf.pad_token_id,
    )


def build_llm(cfg: LLMConfig, load_pretrained: bool = True) -> nn.Module:
    """The family's causal LM: loaded from `cfg.pretrained` (a Llama folder) when set and
    `load_pretrained`, else random.

    A pretrained model's embeddings are resized to `cfg.vocab_size` when the tokenizer grew (the
    image token was added)."""
    import transformers
    from transformers import LlamaForCausalLM

    if not (cfg.pretrained and load_pretrained):
        model_class = getattr(transformers, LLM_FAMILIES[cfg.arch].model_class)
        return model_class(hf_llm_config(cfg))
    saved = llm_config_from_pretrained(cfg.pretrained)
    mismatched = [f for f in _SHAPE_FIELDS if getattr(saved, f) != getattr(cfg, f)]
    if mismatched or saved.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"{cfg.pretrained}: the saved LLM's {mismatched or ['vocab_size']} differ from the "
            "config; build the config with llm_config_from_pretrained()"
        )
    logger.info("loading the LLM from %s", cfg.pretrained)
    model = LlamaForCausalLM.from_pretrained(
        cfg.pretrained, local_files_only=True, dtype=torch.float32
    )
    if saved.vocab_size != cfg.vocab_size:
        model.resize_token_embeddings(cfg.vocab_size)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(cfg, name))
        setattr(model.generation_config, name, getattr(cfg, name))
    return model


def image_attention_masks(
    llm: nn.Module,
    embeds: torch.Tensor,
    image_positions: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> dict[str, torch.Tensor] | None:
    """The attention masks of a prompt for a family whose image tokens attend to each other both
    ways (Gemma 3), built by transformers' own Gemma 3 code: causal, except that each run of
    `image_positions` ([B, T] bool) is one bidirectional block; sliding-window layers keep their
    window. None for a causal family (the model builds its usual mask)."""
    model_class = type(llm).__name__
    family = next((f for f in LLM_FAMILIES.values() if f.model_class == model_class), None)
    if family is None or not family.bidirectional_image or not bool(image_positions.any()):
        return None
    from transformers.models.gemma3.modeling_gemma3 import (
        create_masks_for_vision_model,
        get_block_sequence_ids_for_mask,
    )

    if position_ids is None:
        position_ids = torch.arange(embeds.shape[1], device=embeds.device).unsqueeze(0)
    blocks = get_block_sequence_ids_for_mask(image_positions.long(), embeds.device)
    return create_masks_for_vision_model(
        llm.config, embeds, attention_mask, None, position_ids, blocks
    )
