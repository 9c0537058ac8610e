"""Read GPTQ checkpoints in the standard (v1) format: check the layout, dequantize, load for inference.

The format: config.json with `quantization_config` (`quant_method: "gptq"`, `checkpoint_format:
"gptq"`, zero points stored minus one) and model.safetensors with qweight / qzeros / scales /
g_idx per linear layer. `gptq_format_check` and `dequantize_gptq` read the files with plain
safetensors/torch (no GPTQModel), which both checks the format independently and gives the
reference weights that a GPTQ model's outputs are compared against. `load_gptq_llm` runs the
model through GPTQModel (the maintained successor of AutoGPTQ); writing one is
`cxrlite.quantize.gptq`'s job.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


class GPTQError(CxrliteError, ValueError):
    """A GPTQ request or folder is invalid; the message names the setting, file or tensor."""


@contextlib.contextmanager
def gptqmodel_output() -> Iterator[None]:
    """GPTQModel prints banners, configs and per-layer progress (thousands of lines) to
    stdout/stderr; keep the CLI's output ours and hand its text to the debug log instead."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        text = (out.getvalue() + err.getvalue()).strip()
        if text:
            logger.debug("GPTQModel output:\n%s", text)


def import_gptqmodel() -> Any:
    # GPTQModel sizes its CPU worker pool at import; one worker (its default on two cores) stalls.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    try:
        import gptqmodel
    except ImportError as e:
        raise GPTQError(
            "GPTQ needs GPTQModel: pip install gptqmodel==7.6.0 with torch pinned to the installed "
            f"version (scripts/install_gptq.sh) ({e})"
        ) from None
    return gptqmodel


def load_gptq_llm(
    gptq_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Any:
    """The quantized LlamaForCausalLM (eval mode) for inference. On the CPU it uses GPTQModel's
    pure-torch kernel (the ATen int4 kernel needs widths that are multiples of 16), which runs
    in bfloat16 (default) or float16, not float32."""
    with gptqmodel_output():
        gptqmodel = import_gptqmodel()
    path = Path(gptq_dir)
    gptq_format_check(path)
    on_cpu = torch.device(device).type == "cpu"
    backend = gptqmodel.BACKEND.TORCH if on_cpu else gptqmodel.BACKEND.AUTO
    dtype = dtype or (torch.bfloat16 if on_cpu else torch.float16)
    with gptqmodel_output():
        wrapper = gptqmodel.GPTQModel.load(
            str(path), device=str(torch.device(device)), backend=backend, dtype=dtype
        )
    return wrapper.model.eval()


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GPTQError(f"{path}: no readable config.json ({e})") from None
    quant = config.get("quantization_config")
    if not isinstance(quant, dict):
        raise GPTQError(f"{path}/config.json: no quantization_config")
    return config


def _unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32/bits values each (lowest bits first) -> one int per value."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    if dim == 0:  # qweight: packed along the input rows
        values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
        return values.reshape(-1, packed.shape[1])
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & ((1 << bits) - 1)  # qzeros
    return values.reshape(packed.shape[0], -1)


def gptq_format_check(gptq_dir: str | os.PathLike) -> dict[str, Any]:
    """Assert the standard GPTQ (v1) layout; returns the settings and tensor counts.

    Checks quant_method/format in config.json, then for every quantized linear: int32
    qweight [in/(32/bits), out], int32 qzeros [groups, out/(32/bits)], fp16 scales [groups, out],
    int32 g_idx [in] within range (row // group_size unless desc_act), no float weight beside them,
    and v1 symmetric zero points (2^(bits-1) - 1 stored)."""
    from safetensors import safe_open

    path = Path(gptq_dir)
    config = _read_config(path)
    quant = config["quantization_config"]
    method = quant.get("quant_method")
    fmt = quant.get("checkpoint_format", quant.get("format"))
    if method != "gptq" or fmt != "gptq":
        raise GPTQError(f"{path}: quant_method {method!r} / format {fmt!r}, expected gptq / gptq")
    bits, group_size = int(quant["bits"]), int(quant["group_size"])
    desc_act, sym = bool(quant.get("desc_act")), bool(quant.get("sym", True))
    pack = 32 // bits
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise GPTQError(f"{path}: no {WEIGHTS_FILE} (sharded GPTQ folders are not checked)")
    n_quantized = 0
    with safe_open(str(weights), framework="pt") as f:
        keys = set(f.keys())
        prefixes = sorted(k[: -len(".qweight")] for k in keys if k.endswith(".qweight"))
        for prefix in prefixes:
            parts = {s: f.get_tensor(f"{prefix}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")
                     if f"{prefix}.{s}" in keys}  # fmt: skip
            if len(parts) != 4 or f"{prefix}.weight" in keys:
                raise GPTQError(
                    f"{weights}: {prefix} lacks qweight/qzeros/scales/g_idx or keeps a float weight"
                )
            qweight, qzeros, scales, g_idx = (
                parts[s] for s in ("qweight", "qzeros", "scales", "g_idx")
            )
            in_features, out_features = qweight.shape[0] * pack, qweight.shape[1]
            n_groups = 1 if group_size == -1 else in_features // group_size
            expected = {
                "qweight": (torch.int32, (in_features // pack, out_features)),
                "qzeros": (torch.int32, (n_groups, out_features // pack)),
                "scales": (torch.float16, (n_groups, out_features)),
                "g_idx": (torch.int32, (in_features,)),
            }
            for name, (dtype, shape) in expected.items():
                tensor = parts[name]
                if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise GPTQError(
                        f"{weights}: {prefix}.{name} is {tensor.dtype} {tuple(tensor.shape)}, "
                        f"expected {dtype} {shape}"
                    )
            if not desc_act:
                plain = torch.arange(in_features, dtype=torch.int32) // (
                    group_size if group_size != -1 else in_features
                )
                if not torch.equal(g_idx, plain):
                    raise GPTQError(f"{weights}: {prefix}.g_idx is not row // group_size")
            elif g_idx.min() < 0 or g_idx.max() >= n_groups:
                raise GPTQError(f"{weights}: {prefix}.g_idx points outside {n_groups} groups")
            if sym and not bool((_unpack(qzeros, bits, 1) == (1 << (bits - 1)) - 1).all()):
                raise GPTQError(f"{weights}: {prefix}.qzeros are not v1 symmetric zero points")
            n_quantized += 1
    if n_quantized == 0:
        raise GPTQError(f"{weights}: no quantized linear layers (no *.qweight)")
    return {
        "bits": bits,
        "group_size": group_size,
        "desc_act": desc_act,
        "sym": sym,
        "format": fmt,
        "n_quantized": n_quantized,
        "n_tensors": len(keys),
    }


def dequantize_gptq(gptq_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The folder's weights as float32 HF tensors (`...q_proj.weight` rebuilt from
    qweight/qzeros/scales/g_idx; other tensors as stored), read without GPTQModel:
    W[o, i] = scale[g_idx[i], o] * (q[i, o] - (zero_v1[g_idx[i], o] + 1))."""
    from safetensors.torch import load_file

    path = Path(gptq_dir)
    quant = _read_config(path)["quantization_config"]
    bits = int(quant["bits"])
    state = load_file(str(path / WEIGHTS_FILE))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith(".qweight"):
            prefix = key[: -len(".qweight")]
            q = _unpack(tensor, bits, 0)
            zeros = _unpack(state[f"{prefix}.qzeros"], bits, 1) + 1  # v1 stores zero - 1
            g_idx = state[f"{prefix}.g_idx"].long()
            scales = state[f"{prefix}.scales"].float()
            weight = scales[g_idx] * (q - zeros[g_idx]).float()
            out[f"{prefix}.weight"] = weight.t().contiguous()
        elif not key.endswith((".qzeros", ".scales", ".g_idx")):
            out[key] = tensor.float()
    return out
