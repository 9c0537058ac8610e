"""The engine of `cxrlite bench`: per-phase latency, throughput and memory of a bundle's backends.

    cxrlite bench BUNDLE --runs 10 --warmup 2 --max-tokens 64 --out bench-out/   # the front end
    run_bench("bundle/", BenchSettings(runs=10))                                # the result JSON

What is measured (warm-up runs excluded, `runs` timed runs, p50/p90/p99 of each):
- image: decoding the radiograph's bytes (PNG/JPEG/DICOM) and preprocessing to model pixels
  (`cxrlite.bench.vision_phase`);
- vision jobs, one per vision backend (torch fp32/bf16, ONNX fp32/fp16/int8, TensorRT): the tower
  alone on one image (`cxrlite.bench.vision_phase`);
- LLM jobs, one per LLM variant (torch, GGUF f16/q8_0/q4_k_m, GPTQ): the whole request on the
  default vision backend, exactly `max_tokens` tokens per run, and the time to first token of a
  repeated image (`cxrlite.bench.llm_phase`);
- main-memory bandwidth, the bound of CPU decoding (`cxrlite.bench.bandwidth`).

Memory. Each job runs in its own fresh process by default (`isolate=True`,
`cxrlite.bench.worker`): its peak resident set is that backend's true peak, imports included,
and `load_delta_mb` is the RSS growth from opening the backend(s). Without isolation, jobs share
this process and memory is measured by RSS deltas from the job's start (lower bounds; see
`cxrlite.bench.memory`).

The result is `cxrlite.bench.report`'s JSON schema; report.py turns it into tables and plots.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cxrlite.bench.backends import default_vision_spec
from cxrlite.bench.jobs import BenchError, BenchSettings, build_jobs, image_bytes
from cxrlite.bench.vision_phase import image_phase
from cxrlite.bench.worker import run_job, run_job_isolated

logger = logging.getLogger(__name__)

SCHEMA = "cxrlite-bench/1"

# The job runners stay importable from here, where they lived before the split.
__all__ = ["SCHEMA", "BenchError", "BenchSettings", "run_bench", "run_job", "run_job_isolated"]


def run_bench(bundle_dir: str | os.PathLike, settings: BenchSettings) -> dict[str, Any]:
    """Benchmark every requested backend of a bundle; the result is report.py's JSON schema."""
    from cxrlite.bench import bandwidth, report
    from cxrlite.bundle import load_bundle

    # Sizes only: hashing a multi-gigabyte GGUF would cost more than the benchmark itself.
    bundle = load_bundle(bundle_dir, verify="size")
    data, image_name = image_bytes(settings.image)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "environment": report.environment(),
        "bundle": report.bundle_summary(bundle),
        "settings": {**asdict(settings), "image": image_name},
        "image": image_phase(data, bundle.preprocess, settings.runs, settings.warmup),
        "vision": {},
        "llm": {},
        "skipped": {},
    }
    if settings.bandwidth_mb:
        result["bandwidth"] = bandwidth.measure_bandwidth(
            settings.bandwidth_mb, threads=settings.threads
        )
    with tempfile.TemporaryDirectory(prefix="cxrlite-bench-") as tmp:
        image_file = Path(tmp) / "image"
        image_file.write_bytes(data)
        for job in build_jobs(bundle, settings, image_file, default_vision_spec(bundle)):
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
