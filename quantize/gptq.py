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

Installing GPTQModel 7.6.0 here (CPU torch 2.13): `pip install "gptqmodel==7.6.0" --no-deps` plus
its dependencies with torch and numpy pinned (its numpy==2.2.6 pin is stricter than it needs);
torchao is optional and left out. Its first quantization compiles a small C++ packing kernel
into ~/.cache/gptqmodel (about 45 s on two cores); GPTQMODEL_DISABLE_PACK_EXT=1 uses its Python
packing instead (same files).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cxrlite.config import LLMConfig
from cxrlite.fileio import atomic_dir, write_json

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
WEIGHTS_FILE = "model.safetensors"


class GPTQError(ValueError):
    """A GPTQ request or folder is invalid; the message names the setting, file or tensor."""


@contextlib.contextmanager
def _gptqmodel_output() -> Iterator[None]:
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


def _import_gptqmodel() -> Any:
    # GPTQModel sizes its CPU worker pool at import; one worker (its default on two cores) stalls.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, (os.cpu_count() or 2) // 2)))
    try:
        import gptqmodel
    except ImportError as e:
        raise GPTQError(
            "GPTQ needs GPTQModel: pip install gptqmodel==7.6.0 with torch pinned to the installed "
            f"version (see cxrlite.quantize.gptq) ({e})"
        ) from None
    return gptqmodel


def linear_in_features(cfg: LLMConfig) -> dict[str, int]:
    """Input width of each Llama linear layer kind."""
    return {
        name: cfg.intermediate_size if name == "mlp.down_proj" else cfg.hidden_size
        for name in LINEAR_NAMES
    }


def check_gptq_shapes(cfg: LLMConfig, bits: int, group_size: int) -> None:
    """Raise GPTQError unless every linear layer packs in the standard GPTQ format."""
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
    device: str | None = None,
) -> Path:
    """Quantize the LLM of a cxrlite checkpoint with GPTQ and write a standard HF GPTQ folder.

    `calibration_texts` are encoded with the checkpoint's tokenizer (BOS added, cut at
    `max_tokens`); GPTQModel drops sequences shorter than 10 tokens. `act_order` is GPTQ's
    desc_act (a permuted g_idx, slower kernels); off, g_idx is row // group_size and GPTQModel's
    act-group-aware reordering is turned off as well so the plain layout is written."""
    from cxrlite.model import load
    from cxrlite.tokenizer import save_tokenizer

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    _check_replaceable(out_dir)  # before minutes of work, not after
    model, tokenizer, cfg = load(ckpt_dir)
    check_gptq_shapes(cfg.llm, bits, group_size)
    calibration = _calibration(tokenizer, calibration_texts, max_tokens)
    if not [row for row in calibration if len(row["input_ids"]) >= 10]:
        raise GPTQError("GPTQ needs calibration texts of at least 10 tokens; none were given")
    with _gptqmodel_output():
        gptqmodel = _import_gptqmodel()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
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
        dtype = torch.float32 if device == "cpu" else torch.float16
        with _gptqmodel_output():
            quantizer = gptqmodel.GPTQModel.load(src, quant_config, device=device, dtype=dtype)
            quantizer.quantize(calibration, batch_size=1)
        with atomic_dir(out_dir, lambda p: (p / MARKER_FILE).is_file()) as tmp:
            with _gptqmodel_output():
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


def load_gptq_llm(
    gptq_dir: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """The quantized LlamaForCausalLM (eval mode) for inference. On the CPU it uses GPTQModel's
    pure-torch kernel (the ATen int4 kernel needs widths that are multiples of 16), which runs
    in bfloat16 (default) or float16, not float32."""
    with _gptqmodel_output():
        gptqmodel = _import_gptqmodel()
    path = Path(gptq_dir)
    gptq_format_check(path)
    backend = gptqmodel.BACKEND.TORCH if device == "cpu" else gptqmodel.BACKEND.AUTO
    dtype = dtype or (torch.bfloat16 if device == "cpu" else torch.float16)
    with _gptqmodel_output():
        wrapper = gptqmodel.GPTQModel.load(str(path), device=device, backend=backend, dtype=dtype)
    return wrapper.model.eval()


# --- format check and reference dequantization (plain torch) ----------------------------------


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
