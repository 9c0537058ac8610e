"""`cxrlite doctor`: what this machine can run, and what is missing for which feature.

Every probe is guarded: a broken optional install is reported, never raised, because the
point of doctor is to explain a half-working machine.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import platform
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    needed_for: str = ""
    fix: str = ""


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)

    def add(self, *args, **kwargs) -> Check:
        check = Check(*args, **kwargs)
        self.checks.append(check)
        return check

    @property
    def missing(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_dict(self) -> dict:
        return {"checks": [c.__dict__ for c in self.checks]}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _import(module: str):
    try:
        return importlib.import_module(module), None
    except Exception as e:  # noqa: BLE001 - any failure to import is what we report
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _check_torch(report: DoctorReport) -> None:
    torch, err = _import("torch")
    if torch is None:
        report.add(
            "torch", False, err or "not installed", "everything", "pip install torch==2.13.0"
        )
        return
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB)"
            )
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    report.add(
        "torch",
        True,
        f"{torch.__version__} ({build}); devices: {', '.join(devices)}",
        "training, PyTorch backends",
    )
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        report.add(
            "GPU memory",
            True,
            f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB",
            "GPU serving",
        )
    else:
        report.add(
            "CUDA GPU",
            False,
            "no CUDA device visible to torch",
            "GPU training and serving",
            "install a CUDA build of torch on a machine with an NVIDIA GPU",
        )


def _check_onnxruntime(report: DoctorReport) -> None:
    ort, err = _import("onnxruntime")
    if ort is None:
        report.add(
            "onnxruntime",
            False,
            err or "not installed",
            "ONNX vision tower (export, serve)",
            "pip install onnxruntime (CPU) or onnxruntime-gpu",
        )
        return
    providers = ort.get_available_providers()
    report.add(
        "onnxruntime",
        True,
        f"{ort.__version__}; providers: {', '.join(providers)}",
        "ONNX vision tower",
    )
    if "CUDAExecutionProvider" not in providers:
        report.add(
            "onnxruntime CUDA provider",
            False,
            "not available",
            "GPU ONNX vision tower",
            "pip install onnxruntime-gpu (replaces onnxruntime)",
        )


def _check_tensorrt(report: DoctorReport) -> None:
    trt, err = _import("tensorrt")
    if trt is None:
        report.add(
            "TensorRT",
            False,
            err or "not installed",
            "TensorRT vision engine (--tensorrt)",
            "pip install tensorrt on a machine with an NVIDIA GPU (Volta/V100 needs TensorRT <= 10.4)",
        )
    else:
        report.add("TensorRT", True, trt.__version__, "TensorRT vision engine")


def _check_llama_cpp(report: DoctorReport) -> None:
    llama_cpp, err = _import("llama_cpp")
    if llama_cpp is None:
        report.add(
            "llama-cpp-python",
            False,
            err or "not installed",
            "GGUF LLM backend (serve, report, quantize)",
            "pip install llama-cpp-python (compiles llama.cpp; CMAKE_ARGS=-DGGML_CUDA=on for GPU)",
        )
        return
    try:
        offload = bool(llama_cpp.llama_supports_gpu_offload())
    except Exception as e:  # noqa: BLE001
        offload, err = False, str(e)
    report.add(
        "llama-cpp-python",
        True,
        f"{llama_cpp.__version__}; GPU offload: {'yes' if offload else 'no'}",
        "GGUF LLM backend",
    )
    if not offload:
        report.add(
            "llama.cpp GPU offload",
            False,
            "llama.cpp built without a GPU backend",
            "GPU LLM decoding",
            'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir llama-cpp-python',
        )


def _check_optional(report: DoctorReport) -> None:
    table = [
        # (distribution, import name, feature, fix); versions come from metadata, no import
        (
            "transformers",
            "transformers",
            "model, checkpoints, GPTQ inference",
            "pip install transformers",
        ),
        ("gguf", "gguf", "GGUF export", "pip install gguf"),
        ("onnx", "onnx", "ONNX export", "pip install onnx onnxscript"),
        (
            "gptqmodel",
            "gptqmodel",
            "GPTQ quantization and CUDA kernels",
            "pip install gptqmodel (see README)",
        ),
        ("pydicom", "pydicom", "DICOM input", "pip install pydicom"),
        (
            "pylibjpeg",
            "pylibjpeg",
            "compressed DICOM (JPEG, JPEG-LS, JPEG 2000, RLE)",
            "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle",
        ),
        ("fastapi", "fastapi", "cxrlite serve", "pip install fastapi uvicorn"),
    ]
    for dist, _module, feature, fix in table:
        version = _version(dist)
        if version is None:
            report.add(dist, False, "not installed", feature, fix)
        else:
            report.add(dist, True, version, feature)


def _check_memory(report: DoctorReport) -> None:
    psutil, err = _import("psutil")
    if psutil is None:
        report.add("RAM", False, err or "psutil missing", "memory checks", "pip install psutil")
        return
    vm = psutil.virtual_memory()
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count()
    report.add(
        "RAM",
        True,
        f"{vm.available / 2**30:.1f} GiB free of {vm.total / 2**30:.1f} GiB; {cores} cores "
        f"({platform.machine()})",
        "CPU serving",
    )


def _check_parallelism(report: DoctorReport) -> None:
    """The threads and slots a runtime picks here when not told (cxrlite.runtime.plan)."""
    try:
        from cxrlite.runtime.plan import plan_slots, plan_threads, probe_hardware

        hw = probe_hardware()
    except Exception as e:  # noqa: BLE001 - reported, like every probe
        report.add("threads and slots", False, f"{type(e).__name__}: {e}"[:200], "serving")
        return
    gpu = hw.cuda and hw.llama_gpu_offload
    threads, threads_why = plan_threads(hw, None)
    slots, slots_why = plan_slots(hw, None, gpu=gpu, batching=True)
    report.add("threads", True, f"{threads}: {threads_why} (--threads)", "CPU serving")
    report.add("slots", True, f"{slots}: {slots_why} (--parallel)", "serving under load")


def run_doctor() -> DoctorReport:
    report = DoctorReport()
    report.add("python", True, platform.python_version(), "everything")
    _check_torch(report)
    _check_memory(report)
    _check_onnxruntime(report)
    _check_tensorrt(report)
    _check_llama_cpp(report)
    _check_parallelism(report)
    _check_optional(report)
    return report
