"""Multi-process training through torch's own machinery: torchrun/accelerate env, DDP, FSDP2.

Launch any script that calls `train_stage` with
`torchrun --nproc_per_node N script.py` (or `accelerate launch --multi_gpu ...`, which sets
the same RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* variables). `init_distributed()` reads
them, joins the process group (NCCL on GPUs, gloo on CPUs), and the engine wraps the model
in DistributedDataParallel, or shards it with FSDP2 `fully_shard` when asked.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

Strategy = Literal["ddp", "fsdp"]


class DistributedSetupError(CxrliteError, RuntimeError):
    """The launcher environment is incomplete or inconsistent."""


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise DistributedSetupError(
            f"WORLD_SIZE is set but {name} is not: launch with torchrun or accelerate launch"
        )
    try:
        return int(value)
    except ValueError:
        raise DistributedSetupError(
            f"environment variable {name}={value!r} is not an integer"
        ) from None


def current_context() -> DistContext:
    """The context of an already initialized process group, else a single process."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistContext(rank, local_rank, dist.get_world_size(), dist.get_backend())
    return DistContext()


def init_distributed(backend: str | None = None) -> DistContext:
    """Join the process group described by the launcher's env vars; no-op for one process."""
    if dist.is_available() and dist.is_initialized():
        return current_context()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise DistributedSetupError(f"WORLD_SIZE={world_size} but {name} is not set")
    use_cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl":
        if not use_cuda:
            raise DistributedSetupError("backend nccl needs CUDA; use gloo on CPUs")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    logger.info(
        "joined process group: rank %d/%d (local %d), %s", rank, world_size, local_rank, backend
    )
    return DistContext(rank, local_rank, world_size, backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(
    model: nn.Module,
    ctx: DistContext,
    device: torch.device,
    *,
    strategy: Strategy = "ddp",
    find_unused_parameters: bool = False,
    fsdp_units: Callable[[nn.Module], Iterable[nn.Module]] | None = None,
) -> nn.Module:
    """Wrap for multi-process training; returns `model` itself for one process.

    Freeze parameters BEFORE calling this: DDP registers gradient hooks only for parameters
    that require grad, and would otherwise wait forever for gradients of frozen ones.
    FSDP2 shards in place: each module from `fsdp_units` (e.g. the decoder layers) becomes
    one all-gather unit, then the root takes what is left.
    """
    if not ctx.is_distributed:
        return model
    if strategy == "ddp":
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for unit in fsdp_units(model) if fsdp_units else ():
            fully_shard(unit)
        fully_shard(model)
        return model
    raise ValueError(f"unknown distributed strategy {strategy!r}; use 'ddp' or 'fsdp'")


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-steps (only the last one syncs)."""
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # an FSDP2-sharded module
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum over ranks in place (gloo has no AVG op, so callers divide themselves)."""
    if ctx.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    if not ctx.is_distributed:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """All weights of a (possibly DDP-wrapped or FSDP-sharded) model on the CPU, for saving.

    Call on every rank: FSDP gathers the shards, and rank 0 receives the tensors while the
    other ranks get an empty dict. Keys carry no "module." prefix.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
