"""Opening the backends a benchmark times, by bench name.

Vision: "torch" / "torch-fp32" / "torch-bf16" (the source checkpoint's tower, in PyTorch),
"tensorrt" (the bundle's engine) or a bundle vision variant name ("onnx-fp16").
LLM: "torch" / "torch-fp32" (the checkpoint's LLM) or a bundle LLM variant name ("gguf-q4_k_m").

The PyTorch references run on the device the caller passes (`cxrlite.device.resolve_device`
chooses it once per job); the bundle's variants are planned as the runtime plans them
(`cxrlite.runtime.plan`), so a benchmark times what a server would run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrlite.bundle import Key, Kind

REFERENCE = "torch-fp32"  # the name every speed ratio is taken against


def _reference_path(bundle: Any, checkpoint: str | None) -> Path:
    from cxrlite.runtime.plan import reference_checkpoint

    return reference_checkpoint(bundle, checkpoint)


def open_vision_spec(
    bundle: Any, spec: str, threads: int | None, checkpoint: str | None, *, device: Any
) -> Any:
    """A vision backend by bench name (see the module docstring); `device` (a torch.device or
    its name) is where the PyTorch tower runs."""
    from cxrlite.runtime.plan import BackendError, plan_vision, probe_hardware
    from cxrlite.runtime.vision import TorchVision, open_vision

    if spec in ("torch", REFERENCE, "torch-bf16"):
        import torch

        from cxrlite.model.checkpoint import load_vision_tower

        device = torch.device(device)
        if threads:
            torch.set_num_threads(threads)
        tower = load_vision_tower(_reference_path(bundle, checkpoint))
        if spec == "torch-bf16":
            if not _bf16_supported(device):
                raise BackendError("no native bf16 on this machine (emulated bf16 would mislead)")
            return TorchVision(tower.to(device, torch.bfloat16), "torch-bf16", device.type)
        return TorchVision(tower.to(device), REFERENCE, device.type)
    if spec == "tensorrt":
        hw = probe_hardware(tensorrt=True)
        choice = plan_vision(bundle.vision_variants, None, hw, "tensorrt")
    else:
        if spec not in bundle.vision_variants:
            raise BackendError(f"the bundle has no vision variant {spec!r}")
        hw = probe_hardware(tensorrt=bundle.vision_variants[spec].kind == Kind.TENSORRT)
        choice = plan_vision(bundle.vision_variants, None, hw, "auto", spec)
    return open_vision(bundle, choice, threads=threads)


def _bf16_supported(device: Any) -> bool:
    """Native bf16 on `device`: the GPU's own answer, else the CPU's AVX-512/AMX bf16 flags."""
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    from cxrlite.bench.report import cpu_flags

    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def open_llm_spec(
    bundle: Any,
    spec: str,
    *,
    n_ctx: int,
    threads: int | None,
    n_gpu_layers: int | None,
    checkpoint: str | None,
    device: Any,
) -> Any:
    """An LLM backend by bench name (see the module docstring); `device` is where the PyTorch
    reference runs. llama.cpp offloads all layers to the GPU when it can, unless
    `n_gpu_layers` says otherwise."""
    from cxrlite.runtime.llm import open_llm
    from cxrlite.runtime.plan import BackendError, Choice, plan_llm, probe_hardware

    hw = probe_hardware()
    if n_gpu_layers is None:
        n_gpu_layers = -1 if hw.cuda and hw.llama_gpu_offload else 0
    reference = None
    if spec in ("torch", REFERENCE):
        import torch

        from cxrlite.model.checkpoint import load

        if threads:
            torch.set_num_threads(threads)
        path = _reference_path(bundle, checkpoint)
        _require_llm_weights(path)
        reference = load(path, device=device)[0].llm
        choice = Choice("torch", None, "bench")
    else:
        if spec not in bundle.llm_variants:
            raise BackendError(f"the bundle has no LLM variant {spec!r}")
        choice = plan_llm(bundle.llm_variants, None, hw, "auto", spec)
    return open_llm(
        bundle,
        choice,
        n_ctx=n_ctx,
        threads=threads,
        n_gpu_layers=n_gpu_layers,
        reference_llm=reference,
        device=device,
    )


def _require_llm_weights(ckpt: Path) -> None:
    """Refuse a checkpoint without LLM weights (a random-weight shape's) before building a model
    that would allocate the whole fp32 LLM only to find its weights missing."""
    from safetensors import safe_open

    from cxrlite.model.checkpoint import WEIGHTS_FILE
    from cxrlite.runtime.plan import BackendError

    with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
        if not any(key.startswith("llm.") for key in f.keys()):
            raise BackendError(f"{ckpt} holds no LLM weights (a random-weight shape checkpoint)")


def default_vision_spec(bundle: Any) -> str:
    """The vision backend a runtime would pick here (cxrlite.runtime.plan rules)."""
    from cxrlite.runtime.plan import plan_vision, probe_hardware

    wants_trt = any(v.kind == Kind.TENSORRT for v in bundle.vision_variants.values())
    choice = plan_vision(
        bundle.vision_variants, bundle.default.get(Key.VISION), probe_hardware(tensorrt=wants_trt)
    )
    return choice.variant or "torch"
