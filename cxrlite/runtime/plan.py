"""Which vision and LLM backends a runtime uses: the bundle's defaults, the hardware, the user.

The choice rules are pure functions of the manifest's variants and a `Hardware` description, so
they are tested on any machine; `probe_hardware` fills that description in on this one.

Vision, `auto`: a TensorRT engine built for this GPU and TensorRT version, else ONNX through
onnxruntime (the fp16 graph when its CUDA provider is present, else the bundle default).
LLM, `auto`: the bundle default, unless its backend is missing here, or it is GPTQ without a GPU
(GPTQModel's CPU kernel is pure torch and slow) while a GGUF variant and llama.cpp are at hand.
`torch` is the PyTorch reference: it needs the source checkpoint, verified by sha256.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrlite.bundle import Kind, Variant
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

VISION_BACKENDS = ("auto", "onnx", "tensorrt", "torch")
LLM_BACKENDS = ("auto", "llama.cpp", "gptq", "torch")
_LLM_ALIASES = {"gguf": "llama.cpp", "llamacpp": "llama.cpp", "llama_cpp": "llama.cpp"}
VISION_KINDS = {Kind.ONNX: "onnx", Kind.TENSORRT: "tensorrt"}  # manifest kind -> backend
LLM_KINDS = {Kind.GGUF: "llama.cpp", Kind.GPTQ: "gptq"}
REFERENCE_NAME = "torch-fp32"


class BackendError(CxrliteError, ValueError):
    """A backend or variant was asked for that the bundle lacks or this machine cannot run."""


@dataclass(frozen=True)
class Hardware:
    cuda: bool = False
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    llama_cpp: bool = False
    llama_gpu_offload: bool = False
    gptqmodel: bool = False
    trt_gpu: dict[str, Any] | None = (
        None  # cxrlite.runtime.tensorrt_runner.current_gpu(), if usable
    )
    trt_error: str | None = None  # why TensorRT cannot run here
    cpu_cores: int = 1  # the cores this process may run on


# Sequences decoded together when --parallel is not given. On a CPU a step's cost grows with
# the batch (2 cores are compute-bound), so a few slots take most of the gain; a GPU reads the
# weights once per step whatever the batch, so more slots keep paying.
DEFAULT_SLOTS_CPU = 4
DEFAULT_SLOTS_GPU = 16


def plan_threads(hw: Hardware, requested: int | None) -> tuple[int, str]:
    """CPU threads for the LLM and the vision tower, and why."""
    if requested:
        return requested, "as asked (--threads)"
    if hw.cpu_cores <= 1:
        return 1, "the one core this process may use"
    return hw.cpu_cores - 1, (
        f"{hw.cpu_cores - 1} of {hw.cpu_cores} cores: one is left for the HTTP server, image "
        "decoding and the load around it, because llama.cpp's threads wait for each other at "
        "every step and all stall when another thread takes a core they run on"
    )


def plan_slots(hw: Hardware, requested: int | None, gpu: bool, batching: bool) -> tuple[int, str]:
    """Sequences the LLM decodes together (continuous batching), and why."""
    if not batching:
        return 1, "this LLM backend decodes one sequence at a time"
    if requested:
        return requested, "as asked (--parallel)"
    if gpu:
        return DEFAULT_SLOTS_GPU, "the default on a GPU (a step costs about the same for 1 or 16)"
    return DEFAULT_SLOTS_CPU, "the default on a CPU (batching gains less where compute-bound)"


@dataclass(frozen=True)
class Choice:
    backend: str
    variant: str | None  # the bundle variant; None for the PyTorch reference
    reason: str

    @property
    def name(self) -> str:
        return self.variant or REFERENCE_NAME


def probe_hardware(tensorrt: bool = False) -> Hardware:
    """This machine: CUDA, onnxruntime providers, llama.cpp (and its GPU offload), GPTQModel,
    and with `tensorrt` the GPU/TensorRT description engines are matched against."""
    import torch

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        providers = tuple(onnxruntime.get_available_providers())
    llama, offload = importlib.util.find_spec("llama_cpp") is not None, False
    if llama:
        from cxrlite.runtime.llamacpp import import_llama_cpp

        offload = bool(import_llama_cpp().llama_supports_gpu_offload())
    trt_gpu, trt_error = None, None
    if tensorrt:
        from cxrlite.runtime.tensorrt_runner import TensorRTError, require_tensorrt

        try:
            trt_gpu = require_tensorrt()
        except TensorRTError as e:
            trt_error = str(e)
    return Hardware(
        cpu_cores=len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else (os.cpu_count() or 1),
        cuda=torch.cuda.is_available(),
        ort_providers=providers,
        llama_cpp=llama,
        llama_gpu_offload=offload,
        gptqmodel=importlib.util.find_spec("gptqmodel") is not None,
        trt_gpu=trt_gpu,
        trt_error=trt_error,
    )


def _by_kind(variants: Mapping[str, Variant], kinds: dict[str, str], backend: str) -> list[str]:
    return [name for name, v in variants.items() if kinds.get(v.kind) == backend]


def _engine_usable(variant: Variant, hw: Hardware) -> tuple[bool, str]:
    if hw.trt_gpu is None:
        return False, hw.trt_error or "TensorRT is not available on this machine"
    from cxrlite.runtime.tensorrt_runner import engine_matches

    return engine_matches(variant.engine, hw.trt_gpu)


def plan_vision(
    variants: Mapping[str, Variant],
    default: str | None,
    hw: Hardware,
    backend: str = "auto",
    variant: str | None = None,
) -> Choice:
    if backend not in VISION_BACKENDS:
        raise BackendError(f"vision backend must be one of {VISION_BACKENDS}, got {backend!r}")
    if variant is not None:
        if variant not in variants:
            raise BackendError(
                f"no vision variant {variant!r} in the bundle; have {sorted(variants)}"
            )
        kind = VISION_KINDS.get(variants[variant].kind)
        if kind is None or backend not in ("auto", kind):
            raise BackendError(f"vision variant {variant!r} is not a {backend} variant")
        if kind == "tensorrt":
            ok, why = _engine_usable(variants[variant], hw)
            if not ok:
                raise BackendError(f"vision variant {variant!r} cannot run here: {why}")
        return Choice(kind, variant, "asked for")
    if backend == "torch":
        return Choice("torch", None, "asked for")
    if backend in ("auto", "tensorrt"):
        reasons = []
        for name in _by_kind(variants, VISION_KINDS, "tensorrt"):
            ok, why = _engine_usable(variants[name], hw)
            if ok:
                return Choice("tensorrt", name, f"TensorRT engine matches this GPU ({why})")
            reasons.append(f"{name}: {why}")
        if backend == "tensorrt":
            raise BackendError(
                "no usable TensorRT vision engine: "
                + ("; ".join(reasons) or "the bundle has none (cxrlite export --tensorrt)")
            )
    onnx = _by_kind(variants, VISION_KINDS, "onnx")
    if not onnx:
        raise BackendError(
            "the bundle has no ONNX vision variant; use vision_backend='torch' with the checkpoint"
        )
    if "CUDAExecutionProvider" in hw.ort_providers and "onnx-fp16" in onnx:
        return Choice("onnx", "onnx-fp16", "onnxruntime CUDA provider: fp16 graph")
    if default in onnx:
        return Choice("onnx", default, "bundle default")
    chosen = "onnx-fp32" if "onnx-fp32" in onnx else onnx[0]
    return Choice("onnx", chosen, "first ONNX variant")


def _available(backend: str, hw: Hardware) -> tuple[bool, str]:
    if backend == "llama.cpp" and not hw.llama_cpp:
        return False, "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if backend == "gptq" and not hw.gptqmodel:
        return False, "GPTQModel is not installed (scripts/install_gptq.sh installs it)"
    return True, ""


def _pick(names: list[str], default: str | None, quality: dict[str, Any]) -> str:
    if default in names:
        return default  # type: ignore[return-value]
    deployable = [n for n in names if (quality.get(n) or {}).get("deployable") is True]
    return (deployable or names)[0]


def plan_llm(
    variants: Mapping[str, Variant],
    default: str | None,
    hw: Hardware,
    backend: str = "auto",
    variant: str | None = None,
    quality: dict[str, Any] | None = None,
) -> Choice:
    backend = _LLM_ALIASES.get(backend, backend)
    quality = quality or {}
    if backend not in LLM_BACKENDS:
        raise BackendError(f"LLM backend must be one of {LLM_BACKENDS}, got {backend!r}")
    if variant is not None:
        if variant not in variants:
            raise BackendError(f"no LLM variant {variant!r} in the bundle; have {sorted(variants)}")
        kind = LLM_KINDS.get(variants[variant].kind)
        if kind is None or backend not in ("auto", kind):
            raise BackendError(f"LLM variant {variant!r} is not a {backend} variant")
        ok, why = _available(kind, hw)
        if not ok:
            raise BackendError(f"LLM variant {variant!r} cannot run here: {why}")
        return Choice(kind, variant, "asked for")
    if backend == "torch":
        return Choice("torch", None, "asked for")
    if backend != "auto":
        names = _by_kind(variants, LLM_KINDS, backend)
        if not names:
            raise BackendError(f"the bundle has no {backend} LLM variant; have {sorted(variants)}")
        ok, why = _available(backend, hw)
        if not ok:
            raise BackendError(why)
        return Choice(backend, _pick(names, default, quality), "asked for backend")
    if default is None or default not in variants:
        raise BackendError(
            "the bundle has no LLM variant; use llm_backend='torch' with the checkpoint"
        )
    kind = LLM_KINDS.get(variants[default].kind)
    gguf = _by_kind(variants, LLM_KINDS, "llama.cpp")
    if kind == "gptq" and not hw.cuda and gguf and hw.llama_cpp:
        return Choice("llama.cpp", _pick(gguf, None, quality), "GPTQ needs a GPU to be fast")
    ok, why = _available(kind or "", hw)
    if kind is not None and ok:
        return Choice(kind, default, "bundle default")
    for other in ("llama.cpp", "gptq"):
        names = _by_kind(variants, LLM_KINDS, other)
        if names and _available(other, hw)[0]:
            return Choice(other, _pick(names, None, quality), f"default unusable: {why}")
    raise BackendError(f"no LLM variant of this bundle can run here ({why or 'unknown kind'})")


def reference_checkpoint(bundle: Any, checkpoint: str | os.PathLike | None = None) -> Path:
    """The checkpoint the bundle was exported from (manifest source.path, or `checkpoint`),
    refused unless its weights' sha256 is the one the manifest recorded: a reference that is not
    the bundle's own model would make every comparison meaningless."""
    from cxrlite.bundle import sha256_file
    from cxrlite.model.checkpoint import WEIGHTS_FILE

    source = bundle.source
    path = Path(checkpoint) if checkpoint is not None else Path(source.get("path") or "")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise BackendError(
            f"the PyTorch reference needs the bundle's source checkpoint; {path} has no "
            f"{WEIGHTS_FILE} (pass checkpoint=... / --checkpoint)"
        )
    want, got = source.get("weights_sha256"), sha256_file(weights)
    if got != want:
        raise BackendError(
            f"{weights}: sha256 {got[:12]}... is not the checkpoint this bundle was exported from "
            f"({str(want)[:12]}...); refusing to use it as the reference"
        )
    return path
