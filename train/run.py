"""Run a recipe: each stage starts from the previous stage's checkpoint and writes its own folder.

    cxrlite train --preset small --data phantoms/ --out runs/small            # all four stages
    cxrlite train --preset small --data phantoms/ --out runs/small --stages 2,3

out/stageN-NAME/ holds the engine's files (metrics.jsonl, loss_curve.png, checkpoints/ for
resume, stage_result.json) and checkpoint/, the HF-style model folder the next stage loads.
A stage whose checkpoint/ exists is done and skipped, so re-running the command resumes.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cxrlite.data.datasets import detect_layout, load_dataset
from cxrlite.data.records import Study
from cxrlite.data.tasks import build_tasks
from cxrlite.device import resolve_device
from cxrlite.fileio import write_json
from cxrlite.imaging.preprocess import PreprocessConfig
from cxrlite.model.checkpoint import CONFIG_FILE
from cxrlite.model.config import ModelConfig, get_preset
from cxrlite.train.data import ImageStore
from cxrlite.train.distributed import init_distributed
from cxrlite.train.recipe import StageDef, plan
from cxrlite.train.stages import StageContext, run_stage

logger = logging.getLogger(__name__)


def build_config(preset: str, vision_init: str | None, llm_init: str | None) -> ModelConfig:
    """The preset's shapes, or the shapes of local pretrained weights where given."""
    from cxrlite.model.language import llm_config_from_pretrained
    from cxrlite.model.vision import vision_config_from_pretrained

    cfg = get_preset(preset)
    changes: dict[str, Any] = {}
    if vision_init:
        changes["vision"] = vision_config_from_pretrained(vision_init)
        changes["preprocess"] = None  # follow the pretrained tower's input size and channels
    if llm_init:
        changes["llm"] = llm_config_from_pretrained(llm_init)
    return cfg.replace(**changes) if changes else cfg


def split_studies(studies: list[Study], max_train: int | None) -> dict[str, list[Study]]:
    by_split = {s: [st for st in studies if st.split == s] for s in ("train", "validate", "test")}
    if max_train is not None:
        by_split["train"] = by_split["train"][:max_train]
    if not by_split["train"]:
        raise ValueError("the dataset has no training studies")
    return by_split


def run_recipe(
    data: str | Path,
    out: str | Path,
    *,
    preset: str = "small",
    recipe: str = "chexagent",
    stages: list[int] | None = None,
    steps_scale: float = 1.0,
    lora: bool = False,
    vision_init: str | None = None,
    llm_init: str | None = None,
    device: str | None = None,
    seed: int = 0,
    max_train: int | None = None,
    max_eval: int = 200,
    progress: bool = True,
) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dist = init_distributed()
    choice = resolve_device(device, local_rank=dist.local_rank if dist.world_size > 1 else None)
    logger.info("device %s: %s", choice.device, choice.reason)
    studies = load_dataset(detect_layout(Path(data)), Path(data))
    splits = split_studies(studies, max_train)
    stage_plan = plan(recipe, preset, stages, steps_scale, lora)
    full_table = plan(recipe, preset, None, steps_scale, lora)
    cfg = build_config(preset, vision_init, llm_init)
    pre = PreprocessConfig.from_dict(cfg.preprocess)
    eval_studies = splits["validate"][:max_eval] + splits["test"][:max_eval]
    # Every validation image: the findings head's thresholds are chosen on all of them.
    held = splits["validate"] + splits["test"][:max_eval]
    images = ImageStore([s.image for s in splits["train"] + held], pre)
    records = build_tasks(splits["train"] + eval_studies, seed=seed)
    write_json(
        out / "recipe.json",
        {
            "preset": preset,
            "recipe": recipe,
            "seed": seed,
            "stages": [asdict(s) for s in full_table],
            "n_train": len(splits["train"]),
        },
    )
    ctx = StageContext(
        out=out,
        cfg=cfg,
        splits=splits,
        images=images,
        records=records,
        device=choice.device,
        autocast=choice.autocast_dtype,
        dist=dist,
        seed=seed,
        progress=progress,
        max_eval=max_eval,
        last_stage=full_table[-1].index,
    )
    results: dict[str, Any] = {}
    for stage in stage_plan:
        previous = _previous_checkpoint(out, full_table, stage)
        results[stage.folder] = run_stage(stage, previous, ctx)
    if dist.rank == 0:
        write_json(out / "summary.json", results)
    return results


def _previous_checkpoint(out: Path, table: list[StageDef], stage: StageDef) -> Path | None:
    position = [s.index for s in table].index(stage.index)
    if position == 0:
        return None
    prev = table[position - 1]
    ckpt = out / prev.folder / "checkpoint"
    if not (ckpt / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"stage {stage.index} ({stage.name}) starts from stage {prev.index}'s checkpoint "
            f"{ckpt}, which does not exist: run --stages {prev.index} first"
        )
    return ckpt
