"""One stage of a recipe: build its data and objective from the StageDef, hand them to the engine,
save the HF-style checkpoint the next stage starts from."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cxrlite.data.records import Study, TaskRecord
from cxrlite.data.tasks import task_mix
from cxrlite.eval.evaluation import generate_findings, multiple_choice_accuracy, score_findings
from cxrlite.fileio import write_json
from cxrlite.model.checkpoint import CONFIG_FILE, load, save
from cxrlite.model.config import ModelConfig
from cxrlite.model.tokenizer import bind_tokenizer, build_tokenizer
from cxrlite.model.vlm import CXRVLM
from cxrlite.train.balance import oversample_positives
from cxrlite.train.data import (
    ImageStore,
    ImageTextDataset,
    InstructionDataset,
    TextDataset,
    collate,
    report_label_targets,
)
from cxrlite.train.engine import train_stage
from cxrlite.train.findings_head import fit_findings_head
from cxrlite.train.label_aux import InstructionWithLabels
from cxrlite.train.recipe import LOSS_TERMS, StageDef
from cxrlite.train.spec import StageSpec
from cxrlite.train.text_side import TextSide, VisionPretrainer, report_label_f1

logger = logging.getLogger(__name__)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Multiple-choice tasks scored at the end of the recipe (by option likelihood).
MC_TASKS = (
    "view_classification",
    "binary_disease_classification",
    "single_disease_identification",
    "location_vqa",
    "severity_vqa",
    "image_text_reasoning",
)


@dataclass
class StageContext:
    out: Path
    cfg: ModelConfig
    splits: dict[str, list[Study]]
    images: ImageStore
    records: list[TaskRecord]
    device: torch.device
    autocast: Any
    dist: Any
    seed: int
    progress: bool
    max_eval: int
    last_stage: int


def _start(
    previous: Path | None, ctx: StageContext, stage_dir: Path
) -> tuple[CXRVLM, Any, ModelConfig]:
    """The previous stage's checkpoint, or (first stage) a new model and its tokenizer."""
    if previous is not None:
        return load(previous, device=ctx.device)
    tok_dir = stage_dir / "tokenizer"
    corpus = [s.narrative for s in ctx.splits["train"]]
    if ctx.dist.rank == 0:
        build_tokenizer(ctx.cfg, tok_dir, corpus)
    _barrier(ctx)
    from cxrlite.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    cfg = bind_tokenizer(ctx.cfg, tokenizer)
    torch.manual_seed(ctx.seed)  # same initial weights on every rank and every run
    return CXRVLM(cfg).to(ctx.device), tokenizer, cfg


def _barrier(ctx: StageContext) -> None:
    if ctx.dist.world_size > 1:
        torch.distributed.barrier()


def _parts(model: CXRVLM) -> dict[str, list[torch.nn.Parameter]]:
    return {
        "vision": list(model.vision.parameters()),
        "bridger": list(model.bridger.parameters()),
        "llm": [p for n, p in model.llm.named_parameters() if "lora_" in n or not _has_lora(model)],
    }


def _has_lora(model: CXRVLM) -> bool:
    return any("lora_" in n for n, _ in model.llm.named_parameters())


def _lm_loss(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = module(**batch)
    return {"loss": out.loss, "n_tokens": batch["labels"].ne(-100).sum()}


def _module_loss(
    module: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    return module(**batch)


def _weights(stage: StageDef) -> dict[str, float]:
    return {term: stage.loss_weight(term) for term in LOSS_TERMS[stage.objective]}


@torch.no_grad()
def _mean_loss(
    module: torch.nn.Module, loss_fn, dataset, pad_id: int, device: torch.device, batch: int = 8
) -> float:
    losses, training = [], module.training
    module.eval()
    for start in range(0, len(dataset), batch):
        items = [dataset[i] for i in range(start, min(start + batch, len(dataset)))]
        b = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        losses.append(float(loss_fn(module, b)["loss"]))
    module.train(training)
    return sum(losses) / max(len(losses), 1)


def _records(ctx: StageContext, stage: StageDef, split: str) -> list[TaskRecord]:
    return [r for r in ctx.records if r.split == split and r.task in stage.tasks]


def run_stage(stage: StageDef, previous: Path | None, ctx: StageContext) -> dict[str, Any]:
    stage_dir = ctx.out / stage.folder
    ckpt_dir = stage_dir / "checkpoint"
    if (ckpt_dir / CONFIG_FILE).is_file() and (stage_dir / "result.json").is_file():
        logger.info("%s: already done (%s); skipping", stage.folder, ckpt_dir)
        return json.loads((stage_dir / "result.json").read_text())
    model, tokenizer, cfg = _start(previous, ctx, stage_dir)
    pad, max_len = tokenizer.pad_token_id, cfg.llm.max_position_embeddings
    if stage.lora:
        from peft import LoraConfig, get_peft_model

        model.llm = get_peft_model(
            model.llm,
            LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS),
        )
    images = ctx.images
    if stage.objective == "text_lm":
        module, loss_fn = model, _lm_loss
        train = TextDataset([s.narrative for s in ctx.splits["train"]], tokenizer, max_len)
        val = TextDataset(
            [s.narrative for s in ctx.splits["validate"][: ctx.max_eval]], tokenizer, max_len
        )
        groups = _parts(model)
    elif stage.objective == "vision_pretrain":
        local = stage.loss_weight("report_labels_local") > 0
        text = TextSide(len(tokenizer), cfg.vision, max_len=max_len, pad_id=pad, local_labels=local)
        module, loss_fn = (
            VisionPretrainer(model.vision, cfg.vision, text, _weights(stage)).to(ctx.device),
            _module_loss,
        )
        train = ImageTextDataset(ctx.splits["train"], images, tokenizer, max_len)
        val = ImageTextDataset(ctx.splits["validate"][: ctx.max_eval], images, tokenizer, max_len)
        groups = {
            "vision": list(module.vision.parameters()),
            "text": list(module.text.parameters()),
        }
    else:
        module, loss_fn, groups, image_labels = model, _lm_loss, _parts(model), None
        label_weights = _weights(stage) if stage.objective == "instruction" else {}
        if any(w > 0 for w in label_weights.values()):
            module, loss_fn = (
                InstructionWithLabels(model, label_weights).to(ctx.device),
                _module_loss,
            )
            groups["llm"] += list(module.heads.parameters())  # dropped after the stage
            image_labels = {
                s.image: report_label_targets(s.narrative)
                for split in ("train", "validate")
                for s in ctx.splits[split]
            }
        pool = oversample_positives(
            _records(ctx, stage, "train"),
            ctx.splits["train"],
            stage.positive_boost,
            ctx.seed,
            tasks=stage.boost_tasks,
        )
        mix = task_mix(pool, stage.tasks, seed=ctx.seed)
        train = InstructionDataset(
            mix, images, tokenizer, cfg.n_image_tokens, max_len, image_labels
        )
        val = InstructionDataset(
            _records(ctx, stage, "validate")[: ctx.max_eval],
            images,
            tokenizer,
            cfg.n_image_tokens,
            max_len,
            image_labels,
        )
    spec = StageSpec(
        name=stage.folder,
        max_steps=stage.steps,
        batch_size=stage.batch_size,
        lr={k: v for k, v in stage.lr.items() if k in groups},
        warmup_steps=max(1, int(stage.steps * stage.warmup_frac)),
        checkpoint_every=max(1, stage.steps // 4),
        seed=ctx.seed + stage.index,
        # The ViT's post-layernorm (and pooling head) never feed the selected patch features:
        # DDP must be told, or it waits forever for their gradients.
        ddp_find_unused_parameters=stage.lr.get("vision", 0) > 0,
    )

    def validate(m: torch.nn.Module) -> dict[str, float]:
        metrics = {"val_loss": _mean_loss(module, loss_fn, val, pad, ctx.device)}
        if stage.objective == "vision_pretrain":
            metrics["val_report_label_f1"] = report_label_f1(module, val, pad, ctx.device)
        return metrics

    eval_fn = validate if len(val) else None
    val_before = (
        eval_fn(module)["val_loss"]
        if eval_fn and not (stage_dir / "checkpoints").exists()
        else None
    )
    result = train_stage(
        spec,
        module,
        groups,
        loss_fn,
        train,
        functools.partial(collate, pad_id=pad),
        stage_dir,
        device=ctx.device,
        autocast_dtype=ctx.autocast,
        eval_fn=eval_fn,
        dist_ctx=ctx.dist,
        progress=ctx.progress,
    )
    if stage.lora:
        model.llm = model.llm.merge_and_unload()
    head_fit = None
    if stage.fit_findings_head and ctx.dist.rank == 0:
        cfg, head_fit = fit_findings_head(model, cfg, ctx.splits, images.__getitem__, ctx.seed)
    summary = {
        "stage": stage.folder,
        "steps": result.steps,
        "first_loss": result.first_loss,
        "final_loss": result.final_loss_avg,
        "wall_time_s": result.wall_time_s,
        "eval": result.eval,
        "val_loss_before": val_before,
    }
    if head_fit is not None:
        summary["findings_head"] = head_fit
    if stage.index == ctx.last_stage and ctx.dist.rank == 0:
        summary["quality"] = evaluate_quality(model, tokenizer, ctx)
    if ctx.dist.rank == 0:
        save(model, tokenizer, cfg, ckpt_dir)
        write_json(stage_dir / "result.json", summary)
    _barrier(ctx)
    return summary


def evaluate_quality(model: CXRVLM, tokenizer: Any, ctx: StageContext) -> dict[str, Any]:
    """Held-out (test split) quality: findings F1 from generated text, multiple-choice accuracy."""
    model.eval()
    test = ctx.splits["test"][: ctx.max_eval]
    if not test:
        return {}
    generated = generate_findings(model, tokenizer, test, ctx.images.__getitem__)
    f1 = score_findings(generated, test)
    mc = [r for r in ctx.records if r.split == "test" and r.task in MC_TASKS][: 3 * ctx.max_eval]
    examples = [
        {"id": s.id, "generated": g, "reference": s.findings}
        for s, g in zip(test[:3], generated[:3], strict=True)
    ]
    quality = {
        "n_test": len(test),
        "findings_f1": f1,
        "multiple_choice": multiple_choice_accuracy(model, tokenizer, mc, ctx.images.__getitem__),
        "examples": examples,
    }
    logger.info("held-out findings macro-F1 %.3f over %d studies", f1["macro_f1"], len(test))
    return quality
