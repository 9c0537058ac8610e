"""Training metrics: a JSONL log and a loss-curve PNG.

The in-memory list of records is the truth and travels inside every checkpoint. Each step
appends one line to metrics.jsonl (a single small write) so `tail -f` works during training;
on resume, at checkpoints and at the end the file is rewritten atomically from the list,
which drops lines of steps that a crash made the run repeat.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from cxrlite.fileio import atomic_write_bytes, write_jsonl

logger = logging.getLogger(__name__)


class MetricsLog:
    def __init__(
        self,
        path: str | os.PathLike,
        records: list[dict[str, Any]] | None = None,
        *,
        write: bool = True,
    ) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = list(records or [])
        self.write = write  # False on ranks other than 0: they keep records, write nothing

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def rewrite(self) -> None:
        if self.write:
            write_jsonl(self.path, self.records)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("kind") == kind]


def _smooth(values: list[float], weight: float) -> list[float]:
    smoothed, running = [], None
    for value in values:
        running = value if running is None else weight * running + (1 - weight) * value
        smoothed.append(running)
    return smoothed


def plot_loss_curve(
    records: list[dict[str, Any]], path: str | os.PathLike, *, title: str
) -> Path | None:
    """Write train loss (raw and smoothed), eval losses and the learning rate to a PNG."""
    # The object-oriented Agg canvas, not pyplot: no global figure state, no GUI backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [
        r for r in records if r.get("kind") == "train" and math.isfinite(r.get("loss", math.nan))
    ]
    if not train:
        logger.info("no finite training loss recorded; skipping the loss curve")
        return None
    steps = [r["step"] for r in train]
    losses = [r["loss"] for r in train]
    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    axis.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="train loss")
    if len(losses) > 5:
        weight = min(0.9, 1 - 5 / len(losses))
        axis.plot(
            steps,
            _smooth(losses, weight),
            color="tab:blue",
            linewidth=2,
            label="train loss (smoothed)",
        )
    evals = [r for r in records if r.get("kind") == "eval"]
    eval_keys = sorted(
        {k for r in evals for k in r if "loss" in k and isinstance(r[k], int | float)}
    )
    for key in eval_keys:
        points = [(r["step"], r[key]) for r in evals if key in r]
        axis.plot(*zip(*points, strict=True), marker="o", linewidth=1.5, label=key)
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    lr_axis = axis.twinx()
    lr_axis.plot(
        steps, [r.get("lr", math.nan) for r in train], color="tab:orange", alpha=0.6, linewidth=1
    )
    lr_axis.set_ylabel("learning rate", color="tab:orange")
    axis.legend(loc="upper right", fontsize=8)
    axis.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
