"""Merge a PEFT LoRA adapter into base weights, tensor by tensor: W += (B @ A) * alpha / r.

Written here rather than through peft's merge_and_unload because that needs the whole model
built in memory first (a 7B LLM in fp32 is 28 GB); the arithmetic is peft's own
(tests compare with peft's merge on a tiny model). The merge runs in float32 and the result
takes the base weight's dtype.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from cxrlite.export.importers.common import PublishedModelError

_A, _B = ".lora_A.weight", ".lora_B.weight"


def lora_scale(config: dict[str, Any], where: Path) -> float:
    """alpha / r (alpha / sqrt(r) for rsLoRA); refuses what a plain merge cannot reproduce."""
    if config.get("peft_type") != "LORA":
        raise PublishedModelError(f"{where}: peft_type {config.get('peft_type')!r}, not LORA")
    for field, plain in (("bias", "none"), ("fan_in_fan_out", False), ("use_dora", False)):
        if config.get(field, plain) not in (plain, None):
            raise PublishedModelError(f"{where}: {field}={config[field]!r} is not supported")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, int | float):
        raise PublishedModelError(f"{where}: needs a positive integer r and a lora_alpha")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def merge_lora(
    weights: dict[str, torch.Tensor],
    adapter: dict[str, torch.Tensor],
    scale: float,
    *,
    prefix: str,
    where: Path,
) -> int:
    """Add every adapter pair into `weights` in place; adapter keys are `prefix` + the weight's
    module name + `.lora_A.weight` / `.lora_B.weight`. Returns the number of merged weights."""
    modules = sorted(k[len(prefix) : -len(_A)] for k in adapter if k.endswith(_A))
    stray = [k for k in adapter if not k.startswith(prefix) or not k.endswith((_A, _B))]
    if stray or not modules or len(adapter) != 2 * len(modules):
        raise PublishedModelError(
            f"{where}: not a LoRA adapter of this model (unexpected keys {stray[:3]})"
        )
    for module in modules:
        a, b = adapter[f"{prefix}{module}{_A}"], adapter.get(f"{prefix}{module}{_B}")
        target = weights.get(f"{module}.weight")
        if b is None or target is None:
            raise PublishedModelError(f"{where}: {module}: no lora_B, or no such base weight")
        if a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(target.shape):
            raise PublishedModelError(
                f"{where}: {module}: LoRA {tuple(b.shape)} x {tuple(a.shape)} does not fit the "
                f"base weight {tuple(target.shape)} (another base model?)"
            )
        delta = (b.float() @ a.float()) * scale
        weights[f"{module}.weight"] = (target.float() + delta).to(target.dtype)
    return len(modules)
