"""Running one benchmark job (`cxrlite.bench.jobs`), here or in a fresh worker process.

    python -m cxrlite.bench.worker JOB.json     # internal: run_job_isolated starts this

In its own process a job's peak memory is its backend's alone, imports included (see
`cxrlite.bench.memory`). The device the PyTorch references run on is chosen once per job, by
`cxrlite.device.resolve_device`, and passed down.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from cxrlite.bench.llm_phase import llm_job
from cxrlite.bench.memory import MemorySampler
from cxrlite.bench.vision_phase import vision_job

logger = logging.getLogger(__name__)

JOB_TIMEOUT_S = 3600


def run_job(job: dict[str, Any], isolated: bool = False) -> dict[str, Any]:
    """Run one job in this process: {"ok": True, ...raw timings, memory} or {"ok": False,
    "error": ...} when its backend cannot run here (missing checkpoint, no GPU...)."""
    from cxrlite.bundle import load_bundle
    from cxrlite.device import resolve_device
    from cxrlite.runtime.plan import BackendError

    bundle = load_bundle(job["bundle"], verify=False)  # the parent verified sizes already
    device = resolve_device(None, purpose="benchmark").device
    with MemorySampler(gpu=device.type == "cuda") as memory:
        try:
            body = (vision_job if job["kind"] == "vision" else llm_job)(job, bundle, memory, device)
        except (BackendError, ImportError, OSError, ValueError, RuntimeError) as e:
            logger.info("%s %s cannot run here: %s", job["kind"], job["spec"], e)
            return {**_failed(job), "error": str(e)}
    return {
        "ok": True,
        "kind": job["kind"],
        "spec": job["spec"],
        **body,
        "memory": memory.figures(isolated),
    }


def run_job_isolated(job: dict[str, Any], timeout: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    """run_job in a fresh interpreter (`python -m cxrlite.bench.worker`)."""
    with tempfile.TemporaryDirectory(prefix="cxrlite-bench-") as tmp:
        spec, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({**job, "result": str(out)}), encoding="utf-8")
        cmd = [sys.executable, "-m", "cxrlite.bench.worker", str(spec)]
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


@click.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def worker(job_file: Path) -> None:
    """Run the job in JOB_FILE (written by run_job_isolated) and write its result JSON where the
    job's "result" says."""
    logging.basicConfig(level=logging.WARNING)
    job = json.loads(job_file.read_text(encoding="utf-8"))
    result = run_job(job, isolated=True)
    Path(job["result"]).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    worker()
