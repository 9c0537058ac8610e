"""Published ViT weights -> transformers 5's names (ours): DINOv2 and open_clip.

Three layouts reach us: timm's VisionTransformer (LLaVA-Rad's BiomedCLIP-CXR trunk: fused qkv,
`ls1.gamma` LayerScale, `blocks.N`) and transformers 4's Dinov2Model (MAIRA-2's RAD-DINO:
`attention.attention.query`), both into Dinov2Model; and open_clip's VisionTransformer
(CXR-LLaVA's: `conv1`, `transformer.resblocks.N`, nn.MultiheadAttention's fused `in_proj`) into
CLIPVisionModel. All are tables of renames; a fused qkv is split in three. Shapes are read from
the tensors (tests use tiny widths), and `dinov2_shapes` says which widths they imply so the
importer can check them against the config.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# timm name -> ours, per block ("{i}" is the block index)
_TIMM_BLOCK = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.o_proj.weight",
    "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TIMM_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
# transformers 4 Dinov2 name -> ours, per layer (transformers 5 renamed the attention modules)
_HF4_LAYER = {
    "attention.attention.query": "attention.q_proj",
    "attention.attention.key": "attention.k_proj",
    "attention.attention.value": "attention.v_proj",
    "attention.output.dense": "attention.o_proj",
}


# open_clip VisionTransformer name -> CLIPVisionModel's, per block ("resblocks.N"); its
# attn.in_proj_weight / in_proj_bias (q, k, v stacked, nn.MultiheadAttention's order) are split
_OPEN_CLIP_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# conv1 has no bias in open_clip, nor in CLIP; ln_post is CLIP's post_layernorm. `proj` (the
# pooled CLS's contrastive projection) has no counterpart: the caller decides what to do with it.
_OPEN_CLIP_TOP = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}


def _blocks(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return sorted(found)


def timm_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm DINOv2 ViT trunk's state dict (keys without prefix) in our Dinov2Model names.
    Raises KeyError naming the first key that is missing; leaves unknown keys out (the caller
    checks the key set against the configuration)."""
    out = {ours: state[timm] for timm, ours in _TIMM_TOP.items()}
    width = state["cls_token"].shape[-1]
    # timm has no mask token (it only matters for masked-image training): zeros, unused here
    out["embeddings.mask_token"] = torch.zeros(1, width, dtype=state["cls_token"].dtype)
    for i in _blocks(state, r"blocks\.(\d+)\."):
        for timm, ours in _TIMM_BLOCK.items():
            out[f"encoder.layer.{i}.{ours}"] = state[f"blocks.{i}.{timm}"]
        for part in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{part}"].chunk(3, dim=0)
            for name, tensor in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True):
                out[f"encoder.layer.{i}.attention.{name}.{part}"] = tensor.contiguous()
    return out


def hf4_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers-4 Dinov2Model state dict (keys without prefix) in transformers 5's names."""
    out = {}
    for key, tensor in state.items():
        for old, new in _HF4_LAYER.items():
            key = key.replace(f".{old}.", f".{new}.")
        out[key] = tensor
    return out


def dinov2_shapes(ours: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The widths a Dinov2Model state dict (our names) implies: patch size, channels, hidden and
    MLP width, layers, and the square image side its position table was trained at."""
    patch = ours["embeddings.patch_embeddings.projection.weight"]
    hidden, channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    positions = ours["embeddings.position_embeddings"].shape[1] - 1  # CLS first
    side = round(positions**0.5)
    if side * side != positions:
        raise ValueError(f"{positions} position embeddings (+ CLS) are not a square grid")
    return {
        "hidden_size": hidden,
        "num_channels": channels,
        "patch_size": patch_size,
        "image_size": side * patch_size,
        "num_layers": len(_blocks(ours, r"encoder\.layer\.(\d+)\.")),
        "intermediate_size": ours["encoder.layer.0.mlp.fc1.weight"].shape[0],
    }


def open_clip_to_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip VisionTransformer's state dict (keys without prefix, `proj` taken out) in
    CLIPVisionModel's names. Raises KeyError naming the first key that is missing, ValueError
    naming keys the map does not read (LayerScale, attentional pooling: another architecture,
    which a silent drop would turn into wrong features)."""
    out = {ours: state[theirs] for theirs, ours in _OPEN_CLIP_TOP.items()}
    read = set(_OPEN_CLIP_TOP)
    for i in _blocks(state, r"transformer\.resblocks\.(\d+)\."):
        block = f"transformer.resblocks.{i}."
        for theirs, ours in _OPEN_CLIP_BLOCK.items():
            out[f"encoder.layers.{i}.{ours}"] = state[block + theirs]
            read.add(block + theirs)
        for part in ("weight", "bias"):
            q, k, v = state[f"{block}attn.in_proj_{part}"].chunk(3, dim=0)
            read.add(f"{block}attn.in_proj_{part}")
            for name, tensor in zip(("q_proj", "k_proj", "v_proj"), (q, k, v), strict=True):
                out[f"encoder.layers.{i}.self_attn.{name}.{part}"] = tensor.contiguous()
    unread = sorted(set(state) - read)
    if unread:
        raise ValueError(f"unexpected weights {unread[:4]} (not a plain open_clip ViT)")
    return out
