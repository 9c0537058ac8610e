"""The one training loop every stage runs; a stage differs only by its StageSpec and inputs.

    spec = StageSpec(name="bridger", max_steps=500, batch_size=8, grad_accum=2,
                     lr={"vision": 0.0, "bridger": 1e-3, "llm": 0.0}, warmup_steps=50)
    result = train_stage(spec, model, groups_fn, loss_fn, dataset, collate, "runs/stage2",
                         eval_fn=evaluate)

The run is resumable to the bit: the checkpoint holds the weights of the trainable groups,
AdamW moments, scheduler, data order and every RNG, so a run stopped at any step and resumed
ends with the same parameters as one that never stopped. Ctrl-C (SIGINT) and SIGTERM finish
the current step, write a checkpoint, then raise KeyboardInterrupt / SystemExit.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrlite.device import resolve_device
from cxrlite.train.checkpoint import latest_checkpoint, remove_temp_dirs
from cxrlite.train.distributed import DistContext, Strategy, current_context
from cxrlite.train.optim import ParamGroups
from cxrlite.train.run_state import StageRun, TrainingError
from cxrlite.train.spec import StageResult, StageSpec

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], "torch.Tensor | Mapping[str, Any]"]
EvalFn = Callable[[nn.Module], Mapping[str, float]]
StepCallback = Callable[[int, dict[str, Any]], None]

__all__ = ["StageResult", "StageSpec", "TrainingError", "train_stage"]


class _StopSignals:
    """Turns the first SIGINT/SIGTERM into a request to stop at the next step boundary.

    Stopping mid-step would leave half-accumulated gradients and, under DDP, ranks waiting
    in a collective for a rank that left. A second signal interrupts at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self.restore()
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("signal %d: stopping after this step and writing a checkpoint", signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals are only delivered to the main thread
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            self.restore()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def raise_stop(self) -> None:
        if self.received == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM)
        raise KeyboardInterrupt


def _progress_bar(spec: StageSpec, start: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=spec.max_steps,
        initial=start,
        desc=spec.name,
        unit="step",
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty()),
    )


def train_stage(
    spec: StageSpec,
    model: nn.Module,
    param_groups: ParamGroups,
    loss_fn: LossFn,
    dataset: Sequence[Any],
    collate_fn: Callable[[list[Any]], Any] | None,
    out_dir: str | Path,
    *,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | str | None = "auto",
    eval_fn: EvalFn | None = None,
    resume: bool = True,
    progress: bool = True,
    on_step: StepCallback | None = None,
    dist_ctx: DistContext | None = None,
    strategy: Strategy = "ddp",
    fsdp_units: Callable[[nn.Module], Any] | None = None,
    plot: bool = True,
) -> StageResult:
    """Train `model` for one stage and return its StageResult (also in stage_result.json).

    - `param_groups`: group name -> parameters (or a function of the model returning that);
      the names are the keys of `spec.lr`, and groups at rate 0 are frozen.
    - `loss_fn(model, batch)`: a scalar loss tensor, or a mapping with "loss" and other
      scalars to log ("n_tokens" also yields tokens/s). It must call `model(...)` (the
      wrapped model's forward), or DDP would not synchronize the gradients.
    - `dataset`: map-style (len + getitem); `collate_fn` builds a batch from a list of items.
    - `device`: None/"auto" or a device string; `autocast_dtype`: "auto" follows the device
      (bf16 on CUDA, fp32 on CPU), or give a dtype, or None for fp32.
    - `eval_fn(model) -> {name: number}`: run every `spec.eval_every` steps and at the end,
      in eval mode under no_grad, without disturbing the training RNG.
    - `resume`: continue from the latest complete checkpoint in `out_dir/checkpoints`;
      False deletes old checkpoints and starts over.
    - `on_step(step, record)`: called on every rank after each update (and its checkpoint).
    - Under torchrun (after `init_distributed()`), the model is wrapped in DDP, or sharded
      with FSDP2 when `strategy="fsdp"` (`fsdp_units(model)` names the modules to shard).
    """
    if not isinstance(spec, StageSpec):
        raise TypeError(f"spec must be a StageSpec, got {type(spec).__name__}")
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TrainingError(f"stage {spec.name!r}: dataset must be map-style (len and getitem)")
    ctx = dist_ctx or current_context()
    out_dir = Path(out_dir)
    choice = resolve_device(device, local_rank=ctx.local_rank if ctx.is_distributed else None)
    dtype = choice.autocast_dtype if autocast_dtype == "auto" else autocast_dtype
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TrainingError(f"autocast_dtype must be 'auto', a torch dtype or None, got {dtype!r}")
    if dtype == torch.float16 and strategy == "fsdp" and ctx.is_distributed:
        raise TrainingError("fp16 loss scaling is not supported with FSDP here; use bf16 or fp32")

    run = StageRun(
        spec,
        model,
        param_groups,
        loss_fn,
        dataset,
        collate_fn,
        out_dir,
        device=choice.device,
        autocast_dtype=dtype,
        eval_fn=eval_fn,
        ctx=ctx,
        strategy=strategy,
        fsdp_units=fsdp_units,
    )
    checkpoint_root = out_dir / "checkpoints"
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_temp_dirs(checkpoint_root)
    start_wall = time.perf_counter()
    latest = latest_checkpoint(checkpoint_root) if resume else None
    if latest is not None:
        run.restore(latest)
    else:
        if not resume and ctx.is_main:
            run.discard_previous_run()
        run.start_fresh()
    if run.completed:
        logger.info("stage %s already finished at step %d; weights loaded", spec.name, run.step)
        return run.finish(start_wall, resumed=True, plot=plot)
    resumed = latest is not None

    stop = _StopSignals()
    bar = _progress_bar(spec, run.step, progress and ctx.is_main)
    log_interval = max(1, spec.max_steps // 20)
    try:
        with stop.installed():
            while run.step < spec.max_steps:
                record, stop_now = run.train_step(stop_requested=stop.received is not None)
                step = run.step
                bar.update(1)
                bar.set_postfix(
                    loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False
                )
                if (
                    bar.disable
                    and ctx.is_main
                    and (step % log_interval == 0 or step == spec.max_steps)
                ):
                    logger.info(
                        "stage %s step %d/%d loss %.4f",
                        spec.name,
                        step,
                        spec.max_steps,
                        record["loss"],
                    )
                final = step == spec.max_steps
                if eval_fn is not None and (
                    final or (spec.eval_every and step % spec.eval_every == 0)
                ):
                    run.evaluate()
                if (
                    final
                    or stop_now
                    or (spec.checkpoint_every and step % spec.checkpoint_every == 0)
                ):
                    run.save(completed=final)
                if on_step is not None:
                    on_step(step, record)
                if stop_now and not final:
                    logger.warning(
                        "stage %s stopped by signal at step %d; checkpoint written", spec.name, step
                    )
                    stop.raise_stop()
    except KeyboardInterrupt:
        run.save_after_interrupt()
        raise
    finally:
        bar.close()
    return run.finish(start_wall, resumed=resumed, plot=plot)
