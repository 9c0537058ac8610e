"""A few training steps of a toy model, run by tests/test_distributed.py under torchrun.

`python -m torch.distributed.run --nproc_per_node 2 tests/engine_ddp_worker.py OUT` trains
with batch 1 per rank under DDP (OUT/ddp) and FSDP2 (OUT/fsdp), each crashing after step 4
and resuming from the step-3 checkpoint, and saves every rank's final parameters as
OUT/<strategy>/rank<R>.pt. `run_stage(out, batch_size=2)` without torchrun is
the single-process reference with the same global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from cxrlite.train.distributed import DistContext, init_distributed, shutdown_distributed
from cxrlite.train.engine import train_stage
from cxrlite.train.spec import StageSpec


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # [N, 1]: a squeezed view trips an FSDP2 warning


def dataset(n: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = torch.sin(x.sum(dim=1))
    return [(x[i], y[i]) for i in range(n)]


def collate(items):
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def loss_fn(model: nn.Module, batch) -> dict:
    x, y = batch
    return {"loss": nn.functional.mse_loss(model(x), y.unsqueeze(-1)), "n_tokens": x.shape[0]}


class SimulatedCrash(RuntimeError):
    pass


def crash_at(step_to_crash: int):
    def on_step(step: int, record: dict) -> None:
        if step == step_to_crash:
            raise SimulatedCrash(f"crash after step {step}")

    return on_step


def run_stage(
    out_dir: Path,
    *,
    batch_size: int,
    strategy: str = "ddp",
    ctx: DistContext | None = None,
    on_step=None,
) -> nn.Module:
    spec = StageSpec(
        name="toy-ddp",
        max_steps=6,
        batch_size=batch_size,
        grad_accum=2,
        lr={"body": 0.05, "head": 0.05},
        warmup_steps=2,
        checkpoint_every=3,
        weight_decay=0.01,
    )
    model = TwoLayer()
    train_stage(
        spec,
        model,
        lambda m: {"body": m.body.parameters(), "head": m.head.parameters()},
        loss_fn,
        dataset(),
        collate,
        out_dir,
        device="cpu",
        dist_ctx=ctx,
        strategy=strategy,
        fsdp_units=lambda m: [m.body],
        progress=False,
        plot=False,
        on_step=on_step,
    )
    return model


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):  # an FSDP2 shard
            tensor = tensor.full_tensor()
        out[name] = tensor.detach().clone()
    return out


def main(out_root: Path) -> None:
    ctx = init_distributed("gloo")
    try:
        for strategy in ("ddp", "fsdp"):
            out = out_root / strategy
            try:  # every rank "crashes" after step 4; the checkpoint of step 3 survives
                run_stage(out, batch_size=1, strategy=strategy, ctx=ctx, on_step=crash_at(4))
            except SimulatedCrash:
                pass
            model = run_stage(out, batch_size=1, strategy=strategy, ctx=ctx)  # resumes
            torch.save(full_parameters(model), out_root / strategy / f"rank{ctx.rank}.pt")
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
