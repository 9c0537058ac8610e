"""GPTQ 4-bit (or 2/8-bit) quantization of a checkpoint's LLM with GPTQModel, in the standard format.

GPTQModel is the maintained successor of AutoGPTQ (archived; it does not import with
transformers 5). The output is a HF Llama folder that transformers' GPTQ integration (with
optimum + gptqmodel), vLLM and GPTQModel load: config.json with `quantization_config`
(`quant_method: "gptq"`, `checkpoint_format: "gptq"` — the v1 layout with zero points stored
minus one, not GPTQModel's "gptq_v2"), model.safetensors with qweight / qzeros / scales / g_idx per
linear layer, and our tokenizer (tokenizer.model included).

Shapes: the standard kernels need every linear layer's input width to be a multiple of the group
size and of 32 / bits (the int32 packing). Real Llama sizes always are; small presets must be
chosen for it (hidden 64 and intermediate 128 with group_size 32 or -1). The tiny preset's
intermediate_size of 172 is not a multiple of 8, so it cannot be packed in this format at all;
`quantize_gptq` refuses such shapes with a message rather than write a folder that vLLM rejects.

`gptq_format_check` and `dequantize_gptq` read the files with plain safetensors/torch (no
GPTQModel), which both checks the format independently and gives the reference weights that a
GPTQ model's outputs are compared against.

Installing GPTQModel 7.6.0 with CPU torch 2.13: `pip install "gptqmodel==7.6.0" --no-deps` plus
its dependencies with torch and numpy pinned (its numpy==2.2.6 pin is stricter than it needs);
torchao is optional and left out. Its first quantization compiles a small C++ packing kernel
into ~/.cache/gptqmodel; GPTQMODEL_DISABLE_PACK_EXT=1 uses its Python packing instead (same
files, no compiler needed, so tests set it).

The device is cxrlite.device.resolve_device's (purpose "quantization") unless the caller passes
one: GPTQ runs where the model fits, fp16 on a GPU and fp32 on the CPU.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cxrlite.device import resolve_device
from cxrlite.fileio import atomic_dir, write_json
from cxrlite.model.config import LLMConfig
from cxrlite.runtime.gptq import (
    GPTQError,
    gptq_format_check,
    gptqmodel_output,
    import_gptqmodel,
)

logger = logging.getLogger(__name__)

SUPPORTED_BITS = (2, 4, 8)  # packing divides 32 evenly; 3-bit uses another layout
LINEAR_NAMES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
MARKER_FILE = "cxrlite_gptq.json"


def linear_in_features(cfg: LLMConfig) -> dict[str, int]:
    """Input width of each Llama linear layer kind."""
    return {
        name: cfg.intermediate_size if name == "mlp.down_proj" else cfg.hidden_size
        for name in LINEAR_NAMES
    }


def check_gptq_shapes(cfg: LLMConfig, bits: int, group_size: int) -> None:
    """Raise GPTQError unless every linear layer packs in the standard GPTQ format."""
    if cfg.arch != "llama":
        # The writer and the runtime's loader build a LlamaForCausalLM; GPTQModel quantizes
        # Gemma 3 too, but its folder and loading are not wired here yet.
        raise GPTQError(
            f"GPTQ export takes a Llama-family LLM; this one is {cfg.arch} (use --gguf)"
        )
    if bits not in SUPPORTED_BITS:
        raise GPTQError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size != -1 and group_size <= 0:
        raise GPTQError(f"group_size must be -1 (one group per row) or positive, got {group_size}")
    pack = 32 // bits
    for name, width in linear_in_features(cfg).items():
        if width % pack:
            raise GPTQError(
                f"{name} has {width} input features, not a multiple of {pack}: {bits}-bit weights "
                "cannot be packed into int32 in the standard GPTQ format (choose an LLM width "
                f"that is a multiple of {pack})"
            )
        if group_size != -1 and width % group_size:
            raise GPTQError(
                f"group_size {group_size} does not divide {name}'s {width} input features; use "
                "a divisor of every layer width (e.g. 32 for small models) or -1 (per row)"
            )


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MARKER_FILE).is_file())
    ):
        raise GPTQError(
            f"{out_dir}: exists and is not a cxrlite GPTQ folder; refusing to replace it"
        )


def _calibration(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[dict[str, Any]]:
    rows = []
    for text in texts:
        if text and text.strip():
            ids = tokenizer.encode(text)[:max_tokens]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    return rows


def quantize_gptq(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    calibration_texts: Sequence[str],
    *,
    bits: int = 4,
    group_size: int = 128,
    act_order: bool = False,
    sym: bool = True,
    max_tokens: int = 512,
    device: str | torch.device | None = None,
) -> Path:
    """Quantize the LLM of a cxrlite checkpoint with GPTQ and write a standard HF GPTQ folder.

    `calibration_texts` are encoded with the checkpoint's tokenizer (BOS added, cut at
    `max_tokens`); GPTQModel drops sequences shorter than 10 tokens. `act_order` is GPTQ's
    desc_act (a permuted g_idx, slower kernels); off, g_idx is row // group_size and GPTQModel's
    act-group-aware reordering is turned off as well so the plain layout is written."""
    from cxrlite.model.checkpoint import load
    from cxrlite.model.tokenizer import save_tokenizer

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    _check_replaceable(out_dir)  # before minutes of work, not after
    model, tokenizer, cfg = load(ckpt_dir)
    check_gptq_shapes(cfg.llm, bits, group_size)
    calibration = _calibration(tokenizer, calibration_texts, max_tokens)
    if not [row for row in calibration if len(row["input_ids"]) >= 10]:
        raise GPTQError("GPTQ needs calibration texts of at least 10 tokens; none were given")
    with gptqmodel_output():
        gptqmodel = import_gptqmodel()
    device = resolve_device(device, purpose="quantization").device
    quant_config = gptqmodel.GPTQConfig(
        bits=bits,
        group_size=group_size,
        desc_act=act_order,
        act_group_aware=False,
        sym=sym,
        format="gptq",
    )
    with tempfile.TemporaryDirectory(prefix="cxrlite-gptq-src-") as src:
        # GPTQModel loads a HF folder: the LLM alone, with our tokenizer beside it.
        model.llm.save_pretrained(src)
        save_tokenizer(tokenizer, src)
        del model
        dtype = torch.float32 if device.type == "cpu" else torch.float16
        with gptqmodel_output():
            quantizer = gptqmodel.GPTQModel.load(src, quant_config, device=str(device), dtype=dtype)
            quantizer.quantize(calibration, batch_size=1)
        with atomic_dir(out_dir, lambda p: (p / MARKER_FILE).is_file()) as tmp:
            with gptqmodel_output():
                quantizer.save(str(tmp))
            save_tokenizer(tokenizer, tmp)  # adds tokenizer.model, which GPTQModel does not copy
            write_json(
                tmp / MARKER_FILE,
                {
                    "format": "cxrlite-gptq",
                    "format_version": 1,
                    "source": ckpt_dir.name,
                    "image_token_id": cfg.image_token_id,
                    "n_calibration": len(calibration),
                },
            )
    info = gptq_format_check(out_dir)
    logger.info("wrote GPTQ %d-bit %s (%d quantized linears)", bits, out_dir, info["n_quantized"])
    return out_dir
