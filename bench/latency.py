"""The engine of `cxrlite bench`: per-phase latency, throughput and memory of a bundle's backends.

    python -m cxrlite.bench.latency --worker JOB.json     # one job in this process (internal)
    cxrlite bench BUNDLE --runs 10 --warmup 2 --max-tokens 64 --out bench-out/   # the front end

What is measured (warm-up runs excluded, `runs` timed runs, p50/p90/p99 of each):
- image: decoding the radiograph's bytes (PNG/JPEG/DICOM) and preprocessing to model pixels;
- vision jobs, one per vision backend (torch fp32/bf16, ONNX fp32/fp16/int8, TensorRT): the tower
  alone on one image;
- LLM jobs, one per LLM variant (torch, GGUF f16/q8_0/q4_k_m, GPTQ): the whole request on the
  default vision backend: decode, preprocess, vision, prefill (prompt + image embeddings; time to
  first token includes the image work before it), then exactly `max_tokens` greedy tokens with
  EOS ignored (the backend's prefill/step API is driven directly, so every run and every variant
  decodes the same number of tokens): tokens/s, inter-token latency, end to end;
- a repeated image, per LLM job (`repeated_image`): time to first token through the runtime's
  own request path (`Runtime.complete`, image bytes in, one token) cold, with the embedding cache
  and the LLM's prompt-prefix cache emptied, then for the same image and prompt again (vision
  skipped, the prompt's KV cache reused up to its last position) and for the same image with
  another question (reused up to where the questions differ), with the positions reused.

Memory. Each job runs in its own fresh process by default (`isolate=True`): its peak resident
set (the larger of psutil samples every 5 ms and the kernel's ru_maxrss) is that backend's true
peak, imports included, and `load_delta_mb` is the RSS growth from opening the backend(s).
Without isolation, jobs share this process and memory is measured by RSS deltas from the job's
start: memory freed by earlier jobs and reused is not counted again, so figures are lower bounds.
GPU memory (where torch.cuda exists) is device-wide use from `torch.cuda.mem_get_info`, sampled
the same way, minus the use at the job's start.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.bench.report import summarize
from cxrlite.data.prompts import FINDINGS_PROMPT
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

SCHEMA = "cxrlite-bench/1"
DEFAULT_VISION = ("torch", "torch-bf16", "onnx-fp32", "onnx-fp16", "onnx-int8", "tensorrt")
REFERENCE = "torch-fp32"
PROMPT = FINDINGS_PROMPT
REPEAT_QUESTION = "Is there a pleural effusion?"  # the follow-up question about the same image
JOB_TIMEOUT_S = 3600


class BenchError(CxrliteError, ValueError):
    """A benchmark cannot run as asked (bad bundle, no backend to measure, bad settings)."""


@dataclass
class BenchSettings:
    runs: int = 10
    warmup: int = 2
    max_tokens: int = 64
    vision_backends: tuple[str, ...] = DEFAULT_VISION
    llm_variants: tuple[str, ...] | None = None  # None: "torch" + every LLM variant of the bundle
    threads: int | None = None
    n_gpu_layers: int | None = None
    n_ctx: int | None = None
    checkpoint: str | None = None  # the torch reference's checkpoint, if it moved
    image: str | None = None  # a radiograph file; default a 1024 px phantom PNG
    isolate: bool = True
    bandwidth_mb: int = 512  # 0 skips the bandwidth measurement
    repeated_image: bool = True  # TTFT of a repeated image (3 one-token requests a run)

    def __post_init__(self) -> None:
        if self.runs < 1 or self.warmup < 0 or self.max_tokens < 1:
            raise BenchError(
                f"runs must be >= 1, warmup >= 0 and max_tokens >= 1 (got {self.runs}, "
                f"{self.warmup}, {self.max_tokens})"
            )


# --- memory sampling -------------------------------------------------------------------------


class MemorySampler:
    """Peak RSS (and GPU use) of this process from its start, sampled every `interval` s."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self._cuda = _cuda_available()
        self.baseline_rss = self._process.memory_info().rss
        self.baseline_gpu = self._gpu_used()
        self.peak_rss, self.peak_gpu = self.baseline_rss, self.baseline_gpu
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)

    def _gpu_used(self) -> int | None:
        if not self._cuda:
            return None
        import torch

        free, total = torch.cuda.mem_get_info()
        return int(total - free)

    def sample(self) -> int:
        rss = self._process.memory_info().rss
        self.peak_rss = max(self.peak_rss, rss)
        gpu = self._gpu_used()
        if gpu is not None:
            self.peak_gpu = max(self.peak_gpu or 0, gpu)
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def figures(self, isolated: bool) -> dict[str, Any]:
        peak = self.peak_rss
        if isolated:  # the kernel's own peak catches spikes between two samples
            peak = max(peak, _kernel_peak_rss() or 0)
        out = {
            "method": "subprocess peak RSS" if isolated else "in-process RSS delta",
            "peak_rss_mb": _mb(peak),
            "baseline_rss_mb": _mb(self.baseline_rss),
            "peak_delta_mb": _mb(peak - self.baseline_rss),
        }
        if self.baseline_gpu is not None:
            out["gpu_peak_delta_mb"] = _mb((self.peak_gpu or 0) - self.baseline_gpu)
            out["gpu_peak_used_mb"] = _mb(self.peak_gpu or 0)
        return out


def _kernel_peak_rss() -> int | None:
    """VmHWM, this process's own peak RSS. Not ru_maxrss: Linux carries that across fork and
    exec, so a worker would report its parent's peak when the parent was bigger."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _mb(nbytes: float) -> float:
    return round(nbytes / 2**20, 1)


def _ms(seconds: float) -> float:
    return seconds * 1000.0


# --- opening backends ------------------------------------------------------------------------


def _reference_path(bundle: Any, checkpoint: str | None) -> Path:
    from cxrlite.runtime.plan import reference_checkpoint

    return reference_checkpoint(bundle, checkpoint)


def open_vision_spec(bundle: Any, spec: str, threads: int | None, checkpoint: str | None) -> Any:
    """A vision backend by bench name: "torch" / "torch-bf16" (the checkpoint's tower),
    "tensorrt" (the bundle's engine) or a bundle variant name ("onnx-fp16")."""
    from cxrlite.runtime.plan import BackendError, plan_vision, probe_hardware
    from cxrlite.runtime.vision import TorchVision, open_vision

    if spec in ("torch", "torch-fp32", "torch-bf16"):
        import torch

        from cxrlite.model.checkpoint import load_vision_tower

        if threads:
            torch.set_num_threads(threads)
        tower = load_vision_tower(_reference_path(bundle, checkpoint))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if spec == "torch-bf16":
            if not _bf16_supported():
                raise BackendError("no native bf16 on this machine (emulated bf16 would mislead)")
            return TorchVision(tower.to(device, torch.bfloat16), "torch-bf16", device)
        return TorchVision(tower.to(device), REFERENCE, device)
    if spec == "tensorrt":
        hw = probe_hardware(tensorrt=True)
        choice = plan_vision(bundle.vision_variants, None, hw, "tensorrt")
    else:
        if spec not in bundle.vision_variants:
            raise BackendError(f"the bundle has no vision variant {spec!r}")
        hw = probe_hardware(tensorrt=bundle.vision_variants[spec].get("kind") == "tensorrt")
        choice = plan_vision(bundle.vision_variants, None, hw, "auto", spec)
    return open_vision(bundle, choice, threads=threads)


def _bf16_supported() -> bool:
    import torch

    if torch.cuda.is_available():
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
) -> Any:
    """An LLM backend by bench name: "torch" (the checkpoint's LLM) or a bundle variant name."""
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
        device = "cuda" if torch.cuda.is_available() else "cpu"
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
    )


def _require_llm_weights(ckpt: Path) -> None:
    """Refuse a checkpoint without LLM weights (a random-weight shape's) before building a model
    that would allocate the full fp32 LLM (28 GB at 7B) only to find them missing."""
    from safetensors import safe_open

    from cxrlite.model.checkpoint import WEIGHTS_FILE
    from cxrlite.runtime.plan import BackendError

    with safe_open(str(ckpt / WEIGHTS_FILE), framework="pt") as f:
        if not any(key.startswith("llm.") for key in f.keys()):
            raise BackendError(f"{ckpt} holds no LLM weights (a random-weight shape checkpoint)")


def default_vision_spec(bundle: Any) -> str:
    """The vision backend a runtime would pick here (cxrlite.runtime.plan rules)."""
    from cxrlite.runtime.plan import plan_vision, probe_hardware

    wants_trt = any(v.get("kind") == "tensorrt" for v in bundle.vision_variants.values())
    choice = plan_vision(
        bundle.vision_variants, bundle.default.get("vision"), probe_hardware(tensorrt=wants_trt)
    )
    return choice.variant or "torch"


# --- the prompt ------------------------------------------------------------------------------


def prompt_segments(bundle: Any, tokenizer: Any, embeds: np.ndarray) -> tuple[list[Any], int]:
    """The findings prompt as the runtime feeds it: ids before the image token, the image
    embeddings, ids after; and its length in positions."""
    from cxrlite.model.tokenizer import format_prompt

    cfg = bundle.config
    ids = tokenizer.encode(format_prompt(tokenizer, PROMPT, True), add_special_tokens=False)
    at = ids.index(cfg.image_token_id)
    segments = [s for s in (ids[:at], embeds, ids[at + 1 :]) if len(s)]
    return segments, len(ids) - 1 + len(embeds)


def image_bytes(path: str | None) -> tuple[bytes, str]:
    """The benchmark radiograph: the user's file, else a 1024 px phantom PNG (held-out split)."""
    if path is not None:
        return Path(path).read_bytes(), Path(path).name
    from cxrlite.imaging.write import png_bytes
    from cxrlite.phantoms.generator import make_phantom_study

    _, pixels = make_phantom_study(0, 1, size=1024)
    return png_bytes(pixels), "phantom-1024px.png"


# --- jobs ------------------------------------------------------------------------------------


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, _ms(time.perf_counter() - start)


def _vision_job(job: dict[str, Any], bundle: Any, memory: MemorySampler) -> dict[str, Any]:
    pre = bundle.preprocess
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((1, pre.channels, pre.image_size, pre.image_size), np.float32)
    before = memory.sample()
    vision = open_vision_spec(bundle, job["spec"], job.get("threads"), job.get("checkpoint"))
    loaded = memory.sample()
    times = []
    for i in range(job["warmup"] + job["runs"]):
        out, ms = _timed(vision.encode, pixels)
        if i >= job["warmup"]:
            times.append(ms)
    want = (1, bundle.config.n_image_tokens, bundle.config.llm.hidden_size)
    if out.shape != want:
        raise BenchError(f"vision {job['spec']} returned {out.shape}, not {want}")
    return {
        "name": vision.name,
        "device": vision.device,
        "vision_ms": times,
        "load_delta_mb": _mb(loaded - before),
    }


def _llm_job(job: dict[str, Any], bundle: Any, memory: MemorySampler) -> dict[str, Any]:
    from cxrlite.imaging.decode import load_image
    from cxrlite.imaging.preprocess import preprocess
    from cxrlite.model.tokenizer import load_tokenizer

    data = Path(job["image_file"]).read_bytes()
    tokenizer = load_tokenizer(bundle.tokenizer_dir)
    before = memory.sample()
    vision = open_vision_spec(bundle, job["vision"], job.get("threads"), job.get("checkpoint"))
    after_vision = memory.sample()
    cfg = bundle.config
    n_ctx = job.get("n_ctx") or min(cfg.llm.max_position_embeddings, 4096)
    llm = open_llm_spec(
        bundle,
        job["spec"],
        n_ctx=n_ctx,
        threads=job.get("threads"),
        n_gpu_layers=job.get("n_gpu_layers"),
        checkpoint=job.get("checkpoint"),
    )
    after_llm = memory.sample()
    phases: dict[str, list[float]] = {
        k: []
        for k in ("decode_ms", "preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "e2e_ms")
    }
    phases.update(itl_ms=[], tokens_per_s=[], decode_total_ms=[])
    n_prompt = 0
    for i in range(job["warmup"] + job["runs"]):
        start = time.perf_counter()
        image, t_decode = _timed(load_image, data)
        pixels, t_pre = _timed(preprocess, image.pixels, bundle.preprocess)
        embeds, t_vision = _timed(vision.encode, pixels[None])
        segments, n_prompt = prompt_segments(bundle, tokenizer, embeds[0])
        if n_prompt + job["max_tokens"] > llm.n_ctx:
            raise BenchError(
                f"{n_prompt} prompt positions + {job['max_tokens']} tokens exceed the context "
                f"of {llm.n_ctx}; lower --max-tokens or raise n_ctx"
            )
        t0 = time.perf_counter()
        logits = llm.prefill(segments)
        token = int(np.argmax(logits))  # greedy; EOS is not a stop here, so lengths are equal
        first = time.perf_counter()
        itl = []
        for _ in range(job["max_tokens"] - 1):
            t = time.perf_counter()
            token = int(np.argmax(llm.step(token)))
            itl.append(_ms(time.perf_counter() - t))
        end = time.perf_counter()
        if i < job["warmup"]:
            continue
        decode_s = end - first
        phases["decode_ms"].append(t_decode)
        phases["preprocess_ms"].append(t_pre)
        phases["vision_ms"].append(t_vision)
        phases["prefill_ms"].append(_ms(first - t0))
        phases["ttft_ms"].append(_ms(first - start))
        phases["decode_total_ms"].append(_ms(decode_s))
        phases["itl_ms"].extend(itl)
        if job["max_tokens"] > 1 and decode_s > 0:
            phases["tokens_per_s"].append((job["max_tokens"] - 1) / decode_s)
        phases["e2e_ms"].append(_ms(end - start))
    if job.get("repeated_image", True):
        phases.update(_repeated_image(job, bundle, vision, llm, tokenizer, data))
    llm.close()
    return {
        "name": llm.name,
        "device": llm.device,
        "vision": vision.name,
        "n_prompt": n_prompt,
        "n_ctx": llm.n_ctx,
        "max_tokens": job["max_tokens"],
        "settings": getattr(llm, "settings", {}),
        "vision_load_delta_mb": _mb(after_vision - before),
        "load_delta_mb": _mb(after_llm - after_vision),
        **phases,
    }


def _repeated_image(
    job: dict[str, Any], bundle: Any, vision: Any, llm: Any, tokenizer: Any, data: bytes
) -> dict[str, Any]:
    """TTFT cold vs repeated image through Runtime.complete (see the module docstring)."""
    from cxrlite.runtime.cache import EmbeddingCache
    from cxrlite.runtime.engine import Runtime

    runtime = Runtime(bundle, vision, llm, tokenizer, cache=EmbeddingCache())
    forget = getattr(llm, "clear_prefix_cache", None)  # backends without one never reuse
    ttft: dict[str, list[float]] = {"cold": [], "same": [], "other": []}
    cached: dict[str, int] = {}
    for i in range(job["warmup"] + job["runs"]):
        runtime.cache.clear()
        if forget is not None:
            forget()
        runs = {
            "cold": runtime.complete(PROMPT, data, max_tokens=1),
            "same": runtime.complete(PROMPT, data, max_tokens=1),
            "other": runtime.complete(REPEAT_QUESTION, data, max_tokens=1),
        }
        if i < job["warmup"]:
            continue
        for name, completion in runs.items():
            ttft[name].append(completion.timings["ttft_ms"])
            cached[name] = int(completion.timings.get("prompt_cached_tokens", 0))
    return {
        "repeat_cold_ttft_ms": ttft["cold"],
        "repeat_same_ttft_ms": ttft["same"],
        "repeat_other_ttft_ms": ttft["other"],
        "repeat_cached_tokens": cached,
    }


def run_job(job: dict[str, Any], isolated: bool = False) -> dict[str, Any]:
    """Run one job in this process: {"ok": True, ...raw timings, memory} or {"ok": False,
    "error": ...} when its backend cannot run here (missing checkpoint, no GPU...)."""
    from cxrlite.bundle import load_bundle
    from cxrlite.runtime.plan import BackendError

    bundle = load_bundle(job["bundle"], verify=False)  # the parent verified sizes already
    with MemorySampler() as memory:
        try:
            body = (_vision_job if job["kind"] == "vision" else _llm_job)(job, bundle, memory)
        except (BackendError, ImportError, OSError, ValueError, RuntimeError) as e:
            logger.info("%s %s cannot run here: %s", job["kind"], job["spec"], e)
            return {"ok": False, "kind": job["kind"], "spec": job["spec"], "error": str(e)}
    return {
        "ok": True,
        "kind": job["kind"],
        "spec": job["spec"],
        **body,
        "memory": memory.figures(isolated),
    }


def run_job_isolated(job: dict[str, Any], timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    """run_job in a fresh interpreter (`python -m cxrlite.bench.latency --worker`)."""
    with tempfile.TemporaryDirectory(prefix="cxrlite-bench-") as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({**job, "result": str(out)}), encoding="utf-8")
        cmd = [sys.executable, "-m", "cxrlite.bench.latency", "--worker", str(spec)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {**_failed(job), "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or "").strip().splitlines()[-3:]
            return {**_failed(job), "error": f"worker exited {proc.returncode}: {' | '.join(tail)}"}
        return json.loads(out.read_text(encoding="utf-8"))


def _failed(job: dict[str, Any]) -> dict[str, Any]:
    return {"ok": False, "kind": job["kind"], "spec": job["spec"]}


# --- the whole benchmark ---------------------------------------------------------------------


def _image_phase(data: bytes, pre: Any, runs: int, warmup: int) -> dict[str, Any]:
    from cxrlite.imaging.decode import load_image
    from cxrlite.imaging.preprocess import preprocess

    decode, prep = [], []
    for i in range(warmup + runs):
        image, t_decode = _timed(load_image, data)
        _, t_pre = _timed(preprocess, image.pixels, pre)
        if i >= warmup:
            decode.append(t_decode)
            prep.append(t_pre)
    return {
        "decode_ms": summarize(decode),
        "preprocess_ms": summarize(prep),
        "shape": list(image.pixels.shape),
        "bytes": len(data),
    }


def _llm_specs(bundle: Any, settings: BenchSettings) -> list[str]:
    if settings.llm_variants is not None:
        return list(settings.llm_variants)
    return ["torch", *bundle.llm_variants]


def run_bench(bundle_dir: str | os.PathLike, settings: BenchSettings) -> dict[str, Any]:
    """Benchmark every requested backend of a bundle; the result is report.py's JSON schema."""
    from cxrlite.bench import bandwidth, report
    from cxrlite.bundle import load_bundle

    bundle = load_bundle(bundle_dir, verify="size")  # sha256 of a 14 GB GGUF would take minutes
    data, image_name = image_bytes(settings.image)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": report.environment(),
        "bundle": report.bundle_summary(bundle),
        "settings": {**asdict(settings), "image": image_name},
        "image": _image_phase(data, bundle.preprocess, settings.runs, settings.warmup),
        "vision": {},
        "llm": {},
        "skipped": {},
    }
    if settings.bandwidth_mb:
        result["bandwidth"] = bandwidth.measure_bandwidth(
            settings.bandwidth_mb, threads=settings.threads
        )
    common = {
        "bundle": str(bundle.path),
        "runs": settings.runs,
        "warmup": settings.warmup,
        "threads": settings.threads,
        "checkpoint": settings.checkpoint,
    }
    with tempfile.TemporaryDirectory(prefix="cxrlite-bench-") as tmp:
        image_file = Path(tmp) / "image"
        image_file.write_bytes(data)
        jobs = [{**common, "kind": "vision", "spec": s} for s in settings.vision_backends]
        e2e_vision = default_vision_spec(bundle)
        jobs += [
            {
                **common,
                "kind": "llm",
                "spec": s,
                "vision": e2e_vision,
                "image_file": str(image_file),
                "max_tokens": settings.max_tokens,
                "n_ctx": settings.n_ctx,
                "n_gpu_layers": settings.n_gpu_layers,
                "repeated_image": settings.repeated_image,
            }
            for s in _llm_specs(bundle, settings)
        ]
        for job in jobs:
            logger.info("bench: %s %s", job["kind"], job["spec"])
            raw = run_job_isolated(job) if settings.isolate else run_job(job)
            if not raw["ok"]:
                result["skipped"][f"{job['kind']}:{job['spec']}"] = raw.get("error", "failed")
                continue
            section = result[raw["kind"]]
            section[raw["name"]] = report.summarize_job(raw, bundle)
    if not result["vision"] and not result["llm"]:
        raise BenchError(f"no backend could run: {result['skipped']}")
    report.add_ratios(result)
    report.add_bandwidth_bounds(result)
    report.add_fit_checks(result, bundle)
    return result


# --- worker entry point ----------------------------------------------------------------------


def _worker(spec_path: str) -> int:
    job = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = run_job(job, isolated=True)
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", required=True, help="job JSON written by run_job_isolated")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return _worker(args.worker)


if __name__ == "__main__":
    raise SystemExit(main())
