"""A training stage as data: what to train, for how long, at which rates.

Each of the four stages of the recipe is a `StageSpec` handed to the same engine
(`cxrlite.train.engine.train_stage`); a stage never forks the loop. Learning rates are given
per named parameter group, and a rate of 0 freezes that group (nanoVLM does the same), so
"stage 2 trains the bridger only" is `lr={"vision": 0, "bridger": 1e-3, "llm": 0}`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cxrlite.errors import CxrliteError


class StageSpecError(CxrliteError, ValueError):
    """A stage specification (or its parameter groups) is invalid; the message says which field."""


def _is_int(value: Any) -> bool:
    # bool is an int subclass; `max_steps=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class StageSpec:
    """Everything that defines one training stage, validated on construction.

    Steps count optimizer updates. One update consumes `grad_accum` micro-batches of
    `batch_size` samples on every process, so a run on W processes sees
    `batch_size * grad_accum * W` samples per update.
    """

    name: str
    max_steps: int
    lr: Mapping[str, float]
    batch_size: int = 1
    grad_accum: int = 1
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    clip_grad_norm: float | None = 1.0
    checkpoint_every: int = 0  # 0: only at the end and on interrupt
    eval_every: int = 0  # 0: only at the end (when an eval_fn is given)
    log_every: int = 1
    keep_checkpoints: int = 2
    seed: int = 0
    shuffle: bool = True
    num_workers: int = 0
    ddp_find_unused_parameters: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)  # free-form, recorded with the run

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", dict(self.lr) if isinstance(self.lr, Mapping) else self.lr)
        object.__setattr__(self, "extra", dict(self.extra))
        if isinstance(self.betas, list):
            object.__setattr__(self, "betas", tuple(self.betas))
        self._validate()

    def _validate(self) -> None:
        def fail(field_name: str, why: str) -> None:
            raise StageSpecError(f"stage {self.name!r}: {field_name} {why}")

        if not isinstance(self.name, str) or not self.name.strip():
            raise StageSpecError(f"stage name must be a non-empty string, got {self.name!r}")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                fail(name, f"must be an integer >= 1, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "seed", "num_workers"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                fail(name, f"must be an integer >= 0, got {value!r}")
        if self.warmup_steps > self.max_steps:
            fail("warmup_steps", f"({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if not isinstance(self.lr, Mapping) or not self.lr:
            fail("lr", "must map parameter-group names to learning rates")
        for group, rate in self.lr.items():
            if not isinstance(group, str) or not group:
                fail("lr", f"has a group name that is not a non-empty string: {group!r}")
            if not isinstance(rate, int | float) or isinstance(rate, bool):
                fail("lr", f"[{group!r}] must be a number, got {rate!r}")
            if not math.isfinite(rate) or rate < 0:
                fail("lr", f"[{group!r}] must be finite and >= 0 (0 freezes), got {rate!r}")
        if all(rate == 0 for rate in self.lr.values()):
            fail("lr", "is 0 for every group: nothing would train")
        if not (0.0 <= self.min_lr_ratio <= 1.0):
            fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            fail("weight_decay", f"must be finite and >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            fail("betas", f"must be two numbers in [0, 1), got {self.betas!r}")
        if not (self.adam_eps > 0):
            fail("adam_eps", f"must be > 0, got {self.adam_eps!r}")
        try:
            json.dumps(dict(self.extra))
        except (TypeError, ValueError) as err:
            fail("extra", f"must hold JSON values only ({err})")
        if self.clip_grad_norm is not None and not (
            math.isfinite(self.clip_grad_norm) and self.clip_grad_norm > 0
        ):
            fail("clip_grad_norm", f"must be None (off) or > 0, got {self.clip_grad_norm!r}")

    @property
    def trainable_groups(self) -> list[str]:
        return [group for group, rate in self.lr.items() if rate > 0]

    @property
    def frozen_groups(self) -> list[str]:
        return [group for group, rate in self.lr.items() if rate == 0]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageSpec:
        """Build from a config mapping (JSON/TOML/YAML); unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise StageSpecError(f"unknown stage field(s) {unknown}; known: {sorted(known)}")
        missing = [n for n in ("name", "max_steps", "lr") if n not in data]
        if missing:
            raise StageSpecError(f"stage config lacks required field(s) {missing}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> StageSpec:
        return dataclasses.replace(self, **changes)


# Fields that define which run a checkpoint belongs to: resuming with any of them changed
# would silently train a different model than either the old or the new spec describes.
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "lr", "shuffle")


@dataclass
class StageResult:
    """What a finished `train_stage` call reports (also written as stage_result.json)."""

    name: str
    steps: int
    start_step: int
    first_loss: float | None
    final_loss: float | None
    final_loss_avg: float | None  # mean of the last (up to) 10 logged losses: less noisy
    wall_time_s: float  # this call
    train_time_s: float  # all sessions of this stage together
    samples_seen: int
    eval: dict[str, float]
    checkpoint: str
    out_dir: str
    metrics_path: str
    plot_path: str | None
    resumed: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageResult:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
