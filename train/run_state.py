"""The state of one stage run: model, optimizer, data order, RNG, metrics, and its checkpoints.

`engine.train_stage` drives a `StageRun` step by step; everything a resumed run needs to
continue exactly lives here and goes into each checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from cxrlite.errors import CxrliteError
from cxrlite.fileio import write_json
from cxrlite.train.checkpoint import (
    CheckpointError,
    read_checkpoint,
    step_dir_name,
    write_checkpoint,
)
from cxrlite.train.distributed import (
    DistContext,
    Strategy,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    gradient_sync,
    wrap_model,
)
from cxrlite.train.metrics import MetricsLog, plot_loss_curve
from cxrlite.train.optim import (
    ParamGroups,
    apply_freezing,
    build_optimizer,
    current_lrs,
    resolve_param_groups,
    trainable_parameters,
)
from cxrlite.train.rng import capture_rng_state, preserved_rng, restore_rng_state, seed_everything
from cxrlite.train.sampler import BatchStream, ResumableBatchSampler, move_to_device
from cxrlite.train.schedule import build_lr_scheduler
from cxrlite.train.spec import RESUME_MUST_MATCH, StageResult, StageSpec

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class TrainingError(CxrliteError, RuntimeError):
    """Training cannot go on (bad loss output, bad dataset, non-finite loss)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the update was not applied."""


def _split_loss(output: Any, stage: str) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(output, torch.Tensor):
        loss, extras = output, {}
    elif isinstance(output, Mapping) and "loss" in output:
        loss = output["loss"]
        extras = {}
        for key, value in output.items():
            if key == "loss":
                continue
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                extras[key] = float(value.detach())
            elif isinstance(value, int | float) and not isinstance(value, bool):
                extras[key] = float(value)
    else:
        raise TrainingError(
            f"stage {stage!r}: loss_fn must return a scalar tensor or a mapping with 'loss', got {type(output).__name__}"
        )
    if not isinstance(loss, torch.Tensor) or loss.ndim != 0 or not loss.requires_grad:
        raise TrainingError(f"stage {stage!r}: the loss must be a scalar tensor that requires grad")
    return loss, extras


@dataclass
class _Boundary:
    """Data order and RNG right after the last completed update: what a checkpoint stores."""

    step: int
    sampler: dict[str, int]
    rng: dict[str, Any]


class StageRun:
    def __init__(
        self,
        spec: StageSpec,
        model: nn.Module,
        param_groups: ParamGroups,
        loss_fn: Callable[[nn.Module, Any], Any],
        dataset: Sequence[Any],
        collate_fn: Callable[[list[Any]], Any] | None,
        out_dir: Path,
        *,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        eval_fn: Callable[[nn.Module], Mapping[str, float]] | None,
        ctx: DistContext,
        strategy: Strategy,
        fsdp_units: Callable[[nn.Module], Any] | None,
    ) -> None:
        self.spec, self.loss_fn, self.eval_fn, self.ctx = spec, loss_fn, eval_fn, ctx
        self.device, self.autocast_dtype, self.out_dir = device, autocast_dtype, out_dir
        self.checkpoint_root = out_dir / "checkpoints"
        self.dataset_len = len(dataset)
        model.to(device)
        self.group_names = resolve_param_groups(model, param_groups, spec)
        apply_freezing(model, self.group_names, spec)
        model.train()  # from_pretrained() hands models over in eval mode (dropout off)
        self.model = model
        self.wrapped = wrap_model(
            model,
            ctx,
            device,
            strategy=strategy,
            find_unused_parameters=spec.ddp_find_unused_parameters,
            fsdp_units=fsdp_units,
        )
        fused = device.type == "cuda" and not (strategy == "fsdp" and ctx.is_distributed)
        self.optimizer = build_optimizer(model, self.group_names, spec, fused=fused)
        self.scheduler = build_lr_scheduler(self.optimizer, spec)
        self.scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        try:
            self.sampler = ResumableBatchSampler(
                self.dataset_len,
                spec.batch_size,
                seed=spec.seed,
                rank=ctx.rank,
                world_size=ctx.world_size,
                shuffle=spec.shuffle,
            )
        except ValueError as err:
            raise TrainingError(f"stage {spec.name!r}: {err}") from None
        self.pin_memory = device.type == "cuda"
        self.stream = BatchStream(
            dataset,
            collate_fn,
            self.sampler,
            num_workers=spec.num_workers,
            pin_memory=self.pin_memory,
        )
        self.metrics = MetricsLog(out_dir / "metrics.jsonl", write=ctx.is_main)
        self.step = self.start_step = self.samples_seen = 0
        self.train_time_before = 0.0
        self.session_start = time.perf_counter()
        self.completed = False
        self.final_eval: dict[str, float] = {}
        self.checkpoint_path: Path | None = None
        self._boundary: _Boundary | None = None
        self._saved_step: int | None = None
        self._in_update = self._saving = False

    # ---- start ------------------------------------------------------------------------

    def _mark_boundary(self) -> None:
        self._boundary = _Boundary(
            self.step, self.sampler.state_dict(), capture_rng_state(self.device)
        )

    def train_time(self) -> float:
        return self.train_time_before + (time.perf_counter() - self.session_start)

    def discard_previous_run(self) -> None:
        for path in (
            self.checkpoint_root,
            self.out_dir / "stage_result.json",
            self.out_dir / "loss_curve.png",
        ):
            if path.is_dir():
                logger.warning("resume=False: deleting the previous run's checkpoints in %s", path)
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def start_fresh(self) -> None:
        seed_everything(self.spec.seed + self.ctx.rank)
        self.metrics.records = []
        self.metrics.rewrite()  # drop lines of an earlier attempt that never checkpointed
        self.session_start = time.perf_counter()
        self._mark_boundary()

    def _check_compatible(self, saved: dict[str, Any], path: Path) -> None:
        current = self.spec.to_dict()
        if saved.get("name") != current["name"]:
            raise CheckpointError(
                f"{path} belongs to stage {saved.get('name')!r}, not {current['name']!r}"
            )
        changed = [k for k in RESUME_MUST_MATCH if saved.get(k) != current[k]]
        if changed:
            raise CheckpointError(
                f"cannot resume from {path}: {', '.join(f'{k} {saved.get(k)!r} -> {current[k]!r}' for k in changed)}; "
                "use resume=False or another output folder"
            )

    def restore(self, path: Path) -> None:
        loaded = read_checkpoint(path)
        state = loaded["state.pt"]
        if state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r}")
        self._check_compatible(json.loads(state["spec"]), path)
        model_state = loaded["model.pt"]
        expected = [n for g in self.spec.trainable_groups for n in self.group_names[g]]
        missing = [n for n in expected if n not in model_state]
        if missing:
            raise CheckpointError(f"{path}: lacks trainable parameter(s) {missing[:5]}")
        set_state_dict(
            self.wrapped,
            self.optimizer,
            model_state_dict=model_state,
            optim_state_dict=loaded["optimizer.pt"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
        self.scheduler.load_state_dict(state["scheduler"])
        # Re-derive the rates from this spec: a raised max_steps (to extend a run) changes
        # the cosine; with the same spec this reproduces the saved rates exactly.
        epoch = self.scheduler.last_epoch
        for group, base, fn in zip(
            self.optimizer.param_groups,
            self.scheduler.base_lrs,
            self.scheduler.lr_lambdas,
            strict=True,
        ):
            group["lr"] = base * fn(epoch)
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state_dict(state["sampler"])
        self.stream.reset()
        self.step = self.start_step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])
        self.train_time_before = float(state["train_time_s"])
        self.metrics.records = list(state["metrics"])
        self.metrics.rewrite()
        self.final_eval = dict(state["final_eval"])
        self.completed = bool(state["completed"]) and self.step >= self.spec.max_steps
        self.checkpoint_path = path
        self._saved_step = self.step
        rng_states = state["rng"]
        if len(rng_states) == self.ctx.world_size:
            restore_rng_state(rng_states[self.ctx.rank], self.device)
        else:
            logger.warning(
                "checkpoint was written by %d process(es), now %d: RNG streams reseeded",
                len(rng_states),
                self.ctx.world_size,
            )
            seed_everything(self.spec.seed + self.ctx.rank + 1_000_003 * self.step)
        self.session_start = time.perf_counter()
        self._mark_boundary()
        logger.info("stage %s: resumed from %s (step %d)", self.spec.name, path, self.step)

    # ---- one update -------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, *, stop_requested: bool) -> tuple[dict[str, Any], bool]:
        """One optimizer update over grad_accum micro-batches; returns (record, stop)."""
        spec, accum, world = self.spec, self.spec.grad_accum, self.ctx.world_size
        started = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        extras_sum: dict[str, float] = {}
        for micro in range(accum):
            batch = move_to_device(
                self.stream.next_batch(), self.device, non_blocking=self.pin_memory
            )
            with gradient_sync(self.wrapped, enabled=micro == accum - 1):
                with self._autocast():
                    loss, extras = _split_loss(self.loss_fn(self.wrapped, batch), spec.name)
                self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach().float()
            for key, value in extras.items():
                extras_sum[key] = extras_sum.get(key, 0.0) + value
        # One collective carries the loss, the stop request and the extras, so every rank
        # agrees on stopping and on a non-finite loss before anyone updates.
        keys = sorted(extras_sum)
        packed = torch.stack(
            [
                loss_sum / accum,
                torch.tensor(float(stop_requested), device=self.device),
                *[torch.tensor(extras_sum[k], device=self.device) for k in keys],
            ]
        )
        values = all_reduce_sum(packed.float(), self.ctx).tolist()
        mean_loss, stop = values[0] / world, values[1] > 0
        if not math.isfinite(mean_loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"stage {spec.name!r}: loss is {mean_loss} at step {self.step + 1}; update not applied "
                f"(last checkpoint: {self.checkpoint_path})"
            )
        self._in_update = True
        self.scaler.unscale_(self.optimizer)
        params = trainable_parameters(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.clip_grad_norm or math.inf)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns a DTensor
            grad_norm = grad_norm.full_tensor()
        lrs = current_lrs(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # fp16 loss scaling skips the updates whose gradients overflowed, yet the
            # schedule still counts them (as HF Trainer does); torch warns about that.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.scheduler.step()
        self.step += 1
        samples = spec.batch_size * accum * world
        self.samples_seen += samples
        self._mark_boundary()
        self._in_update = False  # only now do step, data order and RNG agree again
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "kind": "train",
            "step": self.step,
            "epoch": round(self.samples_seen / self.dataset_len, 4),
            "loss": mean_loss,
            "lr": lrs[spec.trainable_groups[0]],
            **{f"lr/{g}": lr for g, lr in lrs.items()},
            "grad_norm": float(grad_norm),
            "samples_per_s": samples / seconds,
            "elapsed_s": round(self.train_time(), 3),
        }
        for key, total in zip(keys, values[2:], strict=True):
            record[key] = total if key == "n_tokens" else total / (accum * world)
        if "n_tokens" in record:
            record["tokens_per_s"] = record["n_tokens"] / seconds
        if self.step % spec.log_every == 0 or self.step in (1, spec.max_steps):
            self.metrics.append(record)
        return record, stop

    # ---- evaluation and checkpoints ---------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        modes = {module: module.training for module in self.model.modules()}
        with preserved_rng(self.device):
            self.model.eval()
            try:
                with torch.no_grad(), self._autocast():
                    output = self.eval_fn(self.model)
            finally:
                for module, training in modes.items():
                    module.training = training
        if not isinstance(output, Mapping):
            raise TrainingError(
                f"stage {self.spec.name!r}: eval_fn must return a mapping of numbers"
            )
        metrics = {}
        for key, value in output.items():
            try:
                metrics[str(key)] = float(value)
            except (TypeError, ValueError):
                raise TrainingError(
                    f"stage {self.spec.name!r}: eval metric {key!r} is not a number"
                ) from None
        self.metrics.append({"kind": "eval", "step": self.step, **metrics})
        if self.step >= self.spec.max_steps:
            self.final_eval = metrics
        logger.info("stage %s step %d eval %s", self.spec.name, self.step, metrics)
        return metrics

    def save(self, *, completed: bool) -> Path:
        """Checkpoint the state at the last step boundary (called on every rank)."""
        boundary = self._boundary
        self._saving = True
        try:
            options = StateDictOptions(
                full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
            )
            model_state, optim_state = get_state_dict(self.wrapped, self.optimizer, options=options)
            rng_states = all_gather_objects(boundary.rng, self.ctx)
            path = self.checkpoint_root / step_dir_name(boundary.step)
            if self.ctx.is_main:
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "step": boundary.step,
                    "spec": json.dumps(self.spec.to_dict()),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(),
                    "sampler": boundary.sampler,
                    "rng": rng_states,
                    "world_size": self.ctx.world_size,
                    "samples_seen": self.samples_seen,
                    "train_time_s": self.train_time(),
                    "metrics": self.metrics.records,
                    "final_eval": self.final_eval,
                    "completed": completed,
                }
                payload = {"model.pt": model_state, "optimizer.pt": optim_state, "state.pt": state}
                path = write_checkpoint(
                    self.checkpoint_root, boundary.step, payload, keep=self.spec.keep_checkpoints
                )
                self.metrics.rewrite()
            barrier(self.ctx)
        finally:
            self._saving = False
        self.checkpoint_path, self._saved_step, self.completed = path, boundary.step, completed
        return path

    def save_after_interrupt(self) -> None:
        if self._saved_step == self.step:
            return
        if self._saving or self._in_update:
            logger.error(
                "interrupted inside a checkpoint write or an update: no new checkpoint (last: %s)",
                self.checkpoint_path,
            )
        elif self.ctx.is_distributed:
            logger.error(
                "interrupted outside a step boundary under %d processes: no checkpoint (last: %s)",
                self.ctx.world_size,
                self.checkpoint_path,
            )
        else:
            logger.warning("interrupted: writing a checkpoint of step %d", self.step)
            self.save(completed=False)

    def finish(self, start_wall: float, *, resumed: bool, plot: bool) -> StageResult:
        losses = [r["loss"] for r in self.metrics.of_kind("train")]
        plot_path = self.out_dir / "loss_curve.png" if plot else None
        if self.ctx.is_main:
            self.metrics.rewrite()
            if plot_path is not None:
                try:
                    plot_path = plot_loss_curve(
                        self.metrics.records, plot_path, title=f"stage {self.spec.name}"
                    )
                except Exception:  # a plotting failure must not discard a finished training
                    logger.exception("could not draw the loss curve")
                    plot_path = None
        tail = losses[-10:]
        result = StageResult(
            name=self.spec.name,
            steps=self.step,
            start_step=self.start_step,
            first_loss=losses[0] if losses else None,
            final_loss=losses[-1] if losses else None,
            final_loss_avg=sum(tail) / len(tail) if tail else None,
            wall_time_s=time.perf_counter() - start_wall,
            train_time_s=self.train_time(),
            samples_seen=self.samples_seen,
            eval=dict(self.final_eval),
            checkpoint=str(self.checkpoint_path),
            out_dir=str(self.out_dir),
            metrics_path=str(self.metrics.path),
            plot_path=str(plot_path) if plot_path else None,
            resumed=resumed,
        )
        if self.ctx.is_main:
            write_json(self.out_dir / "stage_result.json", result.to_dict())
        barrier(self.ctx)
        return result
