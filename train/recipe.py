"""The training recipes as data: which parts train at which learning rate, on which objective.

CheXagent's four stages (its Table 8) and LLaVA-Rad's two-stage variant are tables of `StageDef`;
`train/run.py` walks a table, each stage starting from the previous stage's checkpoint folder.
A learning rate of 0 freezes a part (nanoVLM style); the engine does the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

OBJECTIVES = ("text_lm", "vision_pretrain", "bridger_caption", "instruction")
# Terms of the multi-term objectives and their default weights (the others have a single loss).
# Stage 3's report-label terms (train/label_aux.py) are off unless a stage weighs them.
LOSS_TERMS: dict[str, dict[str, float]] = {
    "vision_pretrain": {
        "contrastive": 1.0,
        "caption": 1.0,
        "report_labels": 1.0,
        "report_labels_local": 0.0,
    },
    "instruction": {"report_labels": 0.0, "answer_start_labels": 0.0},
}

# Instruction task mix of stage 3 (relative weights; see cxrlite.data.tasks.TASKS).
DEFAULT_TASK_RATIOS: dict[str, float] = {
    "findings_generation": 3.0,
    "impression_generation": 1.0,
    "findings_summarization": 0.5,
    "view_classification": 0.5,
    "binary_disease_classification": 1.5,
    "single_disease_identification": 0.5,
    "multi_disease_identification": 0.5,
    "location_vqa": 0.5,
    "severity_vqa": 0.5,
    "image_text_reasoning": 0.5,
}


@dataclass(frozen=True)
class StageDef:
    index: int
    name: str
    objective: str
    lr: dict[str, float]  # parameter group -> peak learning rate; 0 = frozen
    steps: int  # at steps_scale 1 for the `small` preset
    batch_size: int
    lora: bool = False  # train the LLM through LoRA adapters, merged into the weights after
    tasks: dict[str, float] = field(default_factory=dict)  # instruction task -> mix weight
    warmup_frac: float = 0.05
    loss_weights: dict[str, float] = field(default_factory=dict)  # term -> weight (LOSS_TERMS)
    # CheXpert observation -> repeat factor of the records of studies positive for it
    # (balanced sampling of rare findings, train/balance.py); empty: every record once.
    positive_boost: dict[str, float] = field(default_factory=dict)
    # The tasks whose records the boost repeats (None: every task's).
    boost_tasks: tuple[str, ...] | None = ("findings_generation",)
    # After training: fit the findings head on the final image embeddings (train/findings_head.py).
    fit_findings_head: bool = False

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"stage {self.name}: objective must be one of {OBJECTIVES}, got {self.objective!r}"
            )
        terms = LOSS_TERMS.get(self.objective, {})
        unknown = sorted(set(self.loss_weights) - set(terms))
        if unknown:
            raise ValueError(
                f"stage {self.name}: no loss term(s) {unknown} in objective {self.objective} "
                f"(terms: {list(terms)})"
            )
        if any(w < 0 for w in self.loss_weights.values()):
            raise ValueError(f"stage {self.name}: loss weights must be >= 0")
        if self.objective in ("bridger_caption", "instruction") and not self.tasks:
            raise ValueError(f"stage {self.name}: an instruction stage needs a task mix")
        if not any(v > 0 for v in self.lr.values()):
            raise ValueError(f"stage {self.name}: every part is frozen (all learning rates are 0)")

    def loss_weight(self, term: str) -> float:
        return self.loss_weights.get(term, LOSS_TERMS[self.objective][term])

    @property
    def folder(self) -> str:
        return f"stage{self.index}-{self.name}"


# Four departures from CheXagent's table, each measured on held-out phantoms
# (docs/training-experiments.md): the report-label term weighs 5x in stage 1; stage 3 also
# fine-tunes the ViT at a fifth of the LLM's rate; stage 3 adds the report-label term on the
# LLM's image positions (train/label_aux.py); and stage 3's findings task sees the studies with a
# local finding twice as often (train/balance.py), so an unsure model does not settle on the
# negative prior at the findings checklist (the findings task only: boosting every task's moved
# the view prior, sick phantoms being more often AP). CheXagent starts from a ViT pretrained on a
# million images and can keep it frozen; a ViT trained from scratch on a few thousand gets its
# sharpest label signal from the instruction answers.
# fmt: off
CHEXAGENT = (
    StageDef(0, "clinical-llm", "text_lm", {"vision": 0.0, "bridger": 0.0, "llm": 2e-3},
             steps=500, batch_size=16),
    StageDef(1, "vision-encoder", "vision_pretrain", {"vision": 1e-3, "text": 1e-3},
             steps=900, batch_size=32, loss_weights={"report_labels": 5.0}),
    StageDef(2, "bridger", "bridger_caption", {"vision": 0.0, "bridger": 2e-3, "llm": 0.0},
             steps=300, batch_size=16, tasks={"findings_generation": 1.0}),
    StageDef(3, "instruction", "instruction", {"vision": 1e-4, "bridger": 5e-4, "llm": 5e-4},
             steps=900, batch_size=16, tasks=DEFAULT_TASK_RATIOS,
             loss_weights={"report_labels": 1.0},
             positive_boost={"Pleural Effusion": 2.0, "Pneumothorax": 2.0, "Consolidation": 2.0},
             fit_findings_head=True),
)

# LLaVA-Rad: align the projector on captions, then projector + LoRA on the LLM.
LLAVA_RAD = (
    StageDef(1, "projector", "bridger_caption", {"vision": 0.0, "bridger": 2e-3, "llm": 0.0},
             steps=300, batch_size=16, tasks={"findings_generation": 1.0}),
    StageDef(2, "projector-lora", "instruction", {"vision": 0.0, "bridger": 5e-4, "llm": 1e-3},
             steps=900, batch_size=16, lora=True, tasks=DEFAULT_TASK_RATIOS),
)
# fmt: on

RECIPES: dict[str, tuple[StageDef, ...]] = {"chexagent": CHEXAGENT, "llava-rad": LLAVA_RAD}

# Per preset: multiply steps, and cap batch sizes (tiny must finish the recipe in seconds).
PRESET_SCALE: dict[str, tuple[float, int]] = {"tiny": (0.04, 2), "small": (1.0, 64)}


def plan(
    recipe: str,
    preset: str,
    stages: list[int] | None = None,
    steps_scale: float = 1.0,
    lora: bool = False,
) -> list[StageDef]:
    """The stages to run: the recipe's table, scaled for the preset, optionally a subset."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    if steps_scale <= 0:
        raise ValueError("steps_scale must be > 0")
    table = RECIPES[recipe]
    known = [s.index for s in table]
    if stages is not None:
        unknown = sorted(set(stages) - set(known))
        if unknown:
            raise ValueError(f"recipe {recipe} has stages {known}; no stage {unknown}")
    scale, max_batch = PRESET_SCALE.get(preset, (1.0, 64))
    out = []
    for s in table:
        if stages is not None and s.index not in stages:
            continue
        steps = max(2, round(s.steps * scale * steps_scale))
        out.append(
            replace(
                s,
                steps=steps,
                batch_size=min(s.batch_size, max_batch),
                lora=s.lora or (lora and s.lr.get("llm", 0) > 0 and s.objective == "instruction"),
            )
        )
    return out
