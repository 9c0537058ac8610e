"""Quantize an f32/f16 GGUF with llama.cpp's own quantizer (llama_model_quantize).

Types are llama.cpp's file types by their usual names ("q8_0", "q4_k_m", "iq2_xxs", ...), read
from the installed llama_cpp's LLAMA_FTYPE_* constants so the table follows the library.

Small models: k-quants and most IQ types pack 256 values per block, so a tensor whose rows (input
features) are not a multiple of 256 cannot take them. llama.cpp then falls back per tensor to a
32-value block type (Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ* -> IQ4_NL)
and, when rows are not a multiple of 32 either (the tiny preset's 172-wide ffn_down), to F16. The
file loads and runs, but is larger and closer to f16 than its type's name says: the tiny preset's
"q4_k_m" holds Q5_0/Q8_0/F16 tensors. `gguf_tensor_types` shows what a file really holds, and
`quantize_gguf` logs it.

Importance matrix: llama-cpp-python has no imatrix tool (llama-imatrix is a separate program),
but the quantize parameters take per-tensor importance vectors. `compute_imatrix` measures them
in torch (the mean squared input of every linear layer on calibration text, which is what
llama-imatrix collects) and `quantize_gguf(..., imatrix=...)` passes them through. Types named
iq1_*/iq2_*/iq3_xxs and q2_k_s need one.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from cxrlite.errors import CxrliteError
from cxrlite.fileio import atomic_path
from cxrlite.runtime.llamacpp import LlamaCppError, import_llama_cpp

logger = logging.getLogger(__name__)

_FTYPE_PREFIXES = ("LLAMA_FTYPE_MOSTLY_", "LLAMA_FTYPE_ALL_")
# Types that llama.cpp refuses to write without an importance matrix.
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "q2_k_s")


class GGUFQuantizeError(CxrliteError, ValueError):
    """Bad quantization request (unknown type, missing file, missing importance matrix)."""


def quant_types() -> dict[str, int]:
    """Quantization type name -> llama_ftype, from the installed llama_cpp ("q4_k_m" -> 15)."""
    llama_cpp = import_llama_cpp()
    table = {}
    for attr in dir(llama_cpp):
        for prefix in _FTYPE_PREFIXES:
            if attr.startswith(prefix):
                table[attr[len(prefix) :].lower()] = int(getattr(llama_cpp, attr))
    return dict(sorted(table.items(), key=lambda item: item[1]))


def _imatrix_array(llama_cpp: object, imatrix: Mapping[str, np.ndarray]) -> tuple[object, list]:
    """A NULL-terminated llama_model_imatrix_data array, plus the buffers it points into."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    keep_alive: list = []
    for i, (name, values) in enumerate(imatrix.items()):
        data = np.ascontiguousarray(values, dtype=np.float32)
        if data.ndim != 1 or not np.isfinite(data).all():
            raise GGUFQuantizeError(f"imatrix entry {name!r} must be a finite 1-D float array")
        encoded = name.encode()
        keep_alive += [data, encoded]
        entries[i].name = encoded
        entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = data.size
    entries[len(imatrix)].name = None
    return entries, keep_alive


def quantize_gguf(
    src_gguf: str | os.PathLike,
    dst_gguf: str | os.PathLike,
    qtype: str = "q4_k_m",
    nthread: int | None = None,
    imatrix: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write `dst_gguf`, a `qtype` quantization of the f32/f16 `src_gguf`, atomically.

    `imatrix` maps GGUF tensor names ("blk.0.attn_q.weight") to importance vectors of the tensor's
    row length, as `compute_imatrix` returns."""
    llama_cpp = import_llama_cpp()
    types = quant_types()
    name = qtype.lower()
    if name not in types:
        raise GGUFQuantizeError(f"unknown GGUF quantization type {qtype!r}; valid: {sorted(types)}")
    if name in NEEDS_IMATRIX and not imatrix:
        raise GGUFQuantizeError(
            f"{qtype} needs an importance matrix: pass imatrix=compute_imatrix(ckpt, texts)"
        )
    src, dst = Path(src_gguf), Path(dst_gguf)
    if not src.is_file():
        raise GGUFQuantizeError(f"{src}: GGUF file not found")
    if dst.resolve() == src.resolve():
        raise GGUFQuantizeError(f"{dst}: the output would overwrite its own input")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = types[name]
    params.nthread = nthread or os.cpu_count() or 1
    keep_alive: list = []
    if imatrix:
        params.imatrix, keep_alive = _imatrix_array(llama_cpp, imatrix)
    with atomic_path(dst) as tmp:
        status = llama_cpp.llama_model_quantize(
            str(src).encode(), str(tmp).encode(), ctypes.byref(params)
        )
        if status != 0:
            raise LlamaCppError(
                f"llama.cpp could not quantize {src} to {qtype} (status {status}; see the "
                "cxrlite.llama_cpp log)"
            )
    del keep_alive
    logger.info(
        "wrote %s (%s, %.2f MB); weight tensor types: %s",
        dst,
        name,
        dst.stat().st_size / 1e6,
        gguf_tensor_types(dst),
    )
    return dst


def gguf_tensor_types(path: str | os.PathLike) -> dict[str, int]:
    """How many 2-D (weight) tensors of each type a GGUF holds, e.g. {"Q5_0": 12, "F16": 2}."""
    import gguf

    kinds: dict[str, int] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        if len(tensor.shape) >= 2:
            kinds[tensor.tensor_type.name] = kinds.get(tensor.tensor_type.name, 0) + 1
    return kinds


def compute_imatrix(
    ckpt_dir: str | os.PathLike, calibration_texts: Sequence[str], max_tokens: int = 512
) -> dict[str, np.ndarray]:
    """Importance vectors for every linear layer of the checkpoint's LLM: the mean of the squared
    input activations per input feature over the calibration texts (llama-imatrix's statistic),
    keyed by GGUF tensor name. Text only; an image-heavy prompt mix can be added as text
    transcripts of typical prompts."""
    import gguf

    from cxrlite.model.checkpoint import load

    model, tokenizer, cfg = load(ckpt_dir)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.llm.num_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def record(
            _module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: object
        ) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    for module_name, module in model.llm.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = name_map.get_name(module_name + ".weight", try_suffixes=(".weight",))
            if gguf_name is not None:
                hooks.append(module.register_forward_hook(hook(gguf_name)))
    texts = [t for t in calibration_texts if t and t.strip()]
    if not texts:
        raise GGUFQuantizeError("compute_imatrix needs at least one non-empty calibration text")
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer.encode(text)[:max_tokens]
                model.llm(input_ids=torch.tensor([ids]))
    finally:
        for handle in hooks:
            handle.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}
