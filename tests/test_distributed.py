"""The engine under torchrun: 2 CPU processes (gloo), DDP and FSDP2, crash + resume, vs one process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxrlite.fileio import read_jsonl
from cxrlite.train.distributed import (
    DistContext,
    DistributedSetupError,
    current_context,
    full_state_dict,
    init_distributed,
)

WORKER = Path(__file__).with_name("engine_ddp_worker.py")
REPO = Path(__file__).resolve().parents[1]


def _load_worker():
    spec = importlib.util.spec_from_file_location("engine_ddp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_single_process_context_without_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == DistContext() == current_context()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(DistributedSetupError, match="RANK"):
        init_distributed()
    model = _load_worker().TwoLayer()
    saved = full_state_dict(model)
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_two_process_gloo_run_matches_single_process(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tmp_path),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    reference = _load_worker().run_stage(tmp_path / "single", batch_size=2)
    ref_params = {k: v.detach() for k, v in reference.state_dict().items()}
    ref_losses = [r["loss"] for r in read_jsonl(tmp_path / "single" / "metrics.jsonl")]
    initial = _load_worker().TwoLayer().state_dict()

    for strategy in ("ddp", "fsdp"):
        rank0 = torch.load(tmp_path / strategy / "rank0.pt", weights_only=True)
        rank1 = torch.load(tmp_path / strategy / "rank1.pt", weights_only=True)
        for name, tensor in rank0.items():
            assert torch.equal(tensor, rank1[name]), (strategy, name)
            # 2 ranks x batch 1 see the same samples as 1 process x batch 2, and the
            # crash + resume changed nothing
            assert torch.allclose(tensor, ref_params[name], atol=1e-6, rtol=0), (strategy, name)
        assert (rank0["head.weight"] - initial["head.weight"]).abs().max() > 1e-2
        rows = read_jsonl(tmp_path / strategy / "metrics.jsonl")
        assert [r["step"] for r in rows] == list(range(1, 7))  # rank 0 alone, step 4 once
        assert [r["loss"] for r in rows] == pytest.approx(ref_losses, abs=1e-6)  # all-reduced
        assert all(r["n_tokens"] == 4 for r in rows)  # 2 ranks x 2 micro-batches x 1 sample
        checkpoints = sorted(p.name for p in (tmp_path / strategy / "checkpoints").iterdir())
        assert checkpoints == ["step_00000003", "step_00000006"]
