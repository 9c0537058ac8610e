"""CheXinstruct-style instruction tasks built from studies, and the stage-3 task mix.

`TASKS` maps a task name to a `TaskSpec` whose builder turns one study into `TaskItem`s; it
returns nothing for a study that lacks what the task needs (findings, labels, a phantom's
structured truth). Multiple-choice prompts list their options in the prompt text
("Options: a; b; c") so the model sees them, and `TaskRecord.options` keeps them for
exact-match scoring. Each (seed, task, study) gets its own random stream, so a study's records
do not depend on which other studies or tasks were built with it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cxrlite.data.labels import (
    CORE_FINDINGS,
    EDEMA_SEVERITIES,
    EFFUSION_SIZES,
    LOBES,
    NEGATIVE,
    PNEUMOTHORAX_SIZES,
    POSITIVE,
    SIDES,
    VIEWS,
    StudyLabels,
)
from cxrlite.data.prompts import (
    FINDINGS_PROMPTS,
    IMPRESSION_PROMPTS,
    SUMMARY_PROMPTS,
    VIEW_QUESTIONS,
    checklist_text,
    choice_prompt,
    summary_prompt,
)
from cxrlite.data.records import Study, TaskRecord
from cxrlite.fileio import read_jsonl, write_jsonl

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskItem:
    prompt: str
    answer: str
    options: list[str] | None = None


@dataclass(frozen=True)
class TaskSpec:
    build: Callable[[Study, random.Random], list[TaskItem]]
    description: str
    text_only: bool = False  # no image: the record's images list is empty


# How questions name each CheXpert observation, in CheXpert order ("No Finding" is no question).
OBSERVATION_TERMS: dict[str, str] = {
    "Enlarged Cardiomediastinum": "enlarged cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung opacity",
    "Lung Lesion": "a lung lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "another pleural abnormality",
    "Fracture": "a fracture",
    "Support Devices": "support devices",
}
YES_NO = ["yes", "no"]
NONE_OF_THESE = "none of these"
SIDES_OR_BOTH = [*SIDES, "bilateral"]


def _choice(question: str, answer: str, options: Sequence[str]) -> TaskItem:
    return TaskItem(choice_prompt(question, options), answer, list(options))


def study_chexpert(study: Study) -> dict[str, str]:
    """The study's CheXpert labels; a phantom without them gets those its report states."""
    if study.chexpert or study.labels is None:
        return study.chexpert
    from cxrlite.phantoms.reports import chexpert_truth

    return chexpert_truth(study.labels)


def _positives_negatives(study: Study) -> tuple[list[str], list[str]]:
    labels = study_chexpert(study)
    pos = [obs for obs in OBSERVATION_TERMS if labels.get(obs) == POSITIVE]
    neg = [obs for obs in OBSERVATION_TERMS if labels.get(obs) == NEGATIVE]
    return pos, neg


def _core_first(rng: random.Random, observations: list[str], k: int) -> list[str]:
    """k observations, the measured core findings before the rest, each group shuffled."""
    core = [o for o in observations if o in CORE_FINDINGS]
    rest = [o for o in observations if o not in CORE_FINDINGS]
    rng.shuffle(core)
    rng.shuffle(rest)
    return (core + rest)[: max(k, 0)]


# ---------------------------------------------------------------- report text tasks


def findings_checklist(study: Study) -> str:
    """The checklist of the study's core findings (cxrlite.data.prompts.checklist_text)."""
    return checklist_text(study_chexpert(study))


def findings_answer(study: Study) -> str:
    """The findings text the model is trained to write: the checklist, then the report's prose."""
    checklist = findings_checklist(study)
    return f"{checklist} {study.findings}" if checklist else study.findings


def _findings_generation(study: Study, rng: random.Random) -> list[TaskItem]:
    if not study.findings:
        return []
    return [TaskItem(rng.choice(FINDINGS_PROMPTS), findings_answer(study))]


def _impression_generation(study: Study, rng: random.Random) -> list[TaskItem]:
    if not study.impression:
        return []
    return [TaskItem(rng.choice(IMPRESSION_PROMPTS), study.impression)]


def _findings_summarization(study: Study, rng: random.Random) -> list[TaskItem]:
    if not (study.findings and study.impression):
        return []
    # The findings as the model writes them (checklist first): the report route summarizes those.
    prompt = summary_prompt(findings_answer(study), rng.choice(SUMMARY_PROMPTS))
    return [TaskItem(prompt, study.impression)]


# ---------------------------------------------------------------- label tasks


def _view_classification(study: Study, rng: random.Random) -> list[TaskItem]:
    if study.view not in VIEWS:
        return []
    return [_choice(rng.choice(VIEW_QUESTIONS), study.view, list(VIEWS))]


def _binary_disease(study: Study, rng: random.Random) -> list[TaskItem]:
    """At most one yes and one no per study; two yeses when it has no negative label."""
    pos, neg = _positives_negatives(study)
    asked = [(o, "yes") for o in rng.sample(pos, min(len(pos), 1 if neg else 2))]
    asked += [(o, "no") for o in _core_first(rng, neg, 1)]
    return [
        _choice(f"Does this chest X-ray show {OBSERVATION_TERMS[o]}?", answer, YES_NO)
        for o, answer in asked
    ]


def _single_disease(study: Study, rng: random.Random) -> list[TaskItem]:
    pos, neg = _positives_negatives(study)
    if not (pos and neg):
        return []
    answer = OBSERVATION_TERMS[rng.choice(pos)]
    options = [answer, *(OBSERVATION_TERMS[o] for o in _core_first(rng, neg, 3))]
    rng.shuffle(options)
    return [_choice("Which of these findings is present in this chest X-ray?", answer, options)]


def _set_text(observations: Iterable[str]) -> str:
    chosen = set(observations)
    return ", ".join(t for o, t in OBSERVATION_TERMS.items() if o in chosen) or NONE_OF_THESE


def _multi_disease(study: Study, rng: random.Random) -> list[TaskItem]:
    """A panel of 2-4 labeled findings; options are subsets of it, exactly one the truth."""
    pos, neg = _positives_negatives(study)
    present = rng.sample(pos, min(len(pos), 2))
    panel = present + _core_first(rng, neg, 4 - len(present))
    if len(panel) < 2:
        return []
    truth = set(present)
    # Distractors toggle one panel finding, so each is one mistake away from the truth.
    distractors = [truth ^ {o} for o in panel]
    chosen = rng.sample(distractors, min(3, len(distractors)))
    options = [_set_text(truth), *(_set_text(d) for d in chosen)]
    rng.shuffle(options)
    question = f"Which of these findings are present in this chest X-ray: {_set_text(panel)}?"
    return [_choice(question, _set_text(truth), options)]


# ---------------------------------------------------------------- phantom-only tasks


def _location_vqa(study: Study, rng: random.Random) -> list[TaskItem]:
    truth = study.labels
    if truth is None:
        return []
    items = []
    if truth.effusion:
        q = "Which side is the pleural effusion on?"
        items.append(_choice(q, truth.effusion.side, SIDES_OR_BOTH))
    if truth.pneumothorax:
        q = "Which side is the pneumothorax on?"
        items.append(_choice(q, truth.pneumothorax.side, list(SIDES)))
    if truth.consolidation:
        lobe = truth.consolidation.lobe
        options = [lobe, *rng.sample([x for x in LOBES if x != lobe], 3)]
        rng.shuffle(options)
        items.append(_choice("Which lobe is the consolidation in?", lobe, options))
    if truth.nodule:
        term = "mass" if truth.nodule.is_mass else "nodule"
        items.append(_choice(f"Which lung is the {term} in?", truth.nodule.side, list(SIDES)))
    if truth.atelectasis:
        q = "Which side is the atelectasis on?"
        items.append(_choice(q, truth.atelectasis.side, SIDES_OR_BOTH))
    return items


def _severity_vqa(study: Study, rng: random.Random) -> list[TaskItem]:
    truth = study.labels
    if truth is None:
        return []
    items = []
    if truth.effusion:
        q = "How large is the pleural effusion?"
        items.append(_choice(q, truth.effusion.size, EFFUSION_SIZES))
    if truth.pneumothorax:
        q = "How large is the pneumothorax?"
        items.append(_choice(q, truth.pneumothorax.size, PNEUMOTHORAX_SIZES))
    if truth.edema:
        q = "How severe is the pulmonary edema?"
        items.append(_choice(q, truth.edema.severity, EDEMA_SEVERITIES))
    return items


Statement = tuple[str, list[str]]  # a true statement and its false one-word variants


def word_difference(a: str, b: str) -> int | None:
    """Words that differ position by position; None when the word counts differ."""
    wa, wb = a.split(), b.split()
    return sum(x != y for x, y in zip(wa, wb, strict=True)) if len(wa) == len(wb) else None


def _side_statement(side: str, noun: str, sides: Sequence[str] = SIDES) -> Statement:
    # "left X" vs "bilateral X" is clear; "bilateral X" vs "left X" is not (a bilateral
    # finding is also on the left), so bilateral is contrasted with "unilateral" instead.
    if side == "bilateral":
        return f"bilateral {noun}", [f"unilateral {noun}"]
    return f"{side} {noun}", [f"{s} {noun}" for s in sides if s != side]


def _scale_statement(value: str, scale: Sequence[str], noun: str) -> Statement:
    return f"{value} {noun}", [f"{s} {noun}" for s in scale if s != value]


def reasoning_statements(truth: StudyLabels) -> tuple[list[Statement], list[Statement]]:
    """(true statement, false one-word variants) pairs: (present findings, everything else)."""
    present: list[Statement] = []
    general: list[Statement] = []
    heart = ("enlarged", "normal") if truth.cardiomegaly else ("normal", "enlarged")
    general.append((f"{truth.view} view", [f"{v} view" for v in VIEWS if v != truth.view]))
    general.append((f"{heart[0]} cardiac silhouette", [f"{heart[1]} cardiac silhouette"]))
    if truth.effusion:
        present.append(_side_statement(truth.effusion.side, "pleural effusion", SIDES_OR_BOTH))
        present.append(_scale_statement(truth.effusion.size, EFFUSION_SIZES, "pleural effusion"))
    else:
        general.append(("no pleural effusion", [f"{s} pleural effusion" for s in SIDES]))
    if truth.pneumothorax:
        present.append(_side_statement(truth.pneumothorax.side, "pneumothorax"))
        sizes = PNEUMOTHORAX_SIZES
        present.append(_scale_statement(truth.pneumothorax.size, sizes, "pneumothorax"))
    else:
        general.append(("no pneumothorax", [f"{s} pneumothorax" for s in SIDES]))
    if truth.edema:
        sev = truth.edema.severity
        present.append(_scale_statement(sev, EDEMA_SEVERITIES, "pulmonary edema"))
    if truth.consolidation:
        lobe = truth.consolidation.lobe
        near = [f"{x} consolidation" for x in LOBES if word_difference(x, lobe) == 1]
        if near:  # the lingula has no one-word neighbour
            present.append((f"{lobe} consolidation", near))
    if truth.nodule:
        term = "mass" if truth.nodule.is_mass else "nodule"
        present.append(_side_statement(truth.nodule.side, f"lung {term}"))
    if truth.atelectasis:
        present.append(
            _side_statement(truth.atelectasis.side, "basilar atelectasis", SIDES_OR_BOTH)
        )
    return present, general


def _image_text_reasoning(study: Study, rng: random.Random) -> list[TaskItem]:
    """Two statements differing in one word, exactly one true; present findings first."""
    if study.labels is None:
        return []
    present, general = reasoning_statements(study.labels)
    rng.shuffle(present)
    rng.shuffle(general)
    items = []
    for true, variants in (present + general)[:2]:
        options = [true, rng.choice(variants)]
        rng.shuffle(options)
        items.append(_choice("Which statement about this chest X-ray is true?", true, options))
    return items


TASKS: dict[str, TaskSpec] = {
    "findings_generation": TaskSpec(_findings_generation, "write the findings section"),
    "impression_generation": TaskSpec(_impression_generation, "write the impression"),
    "findings_summarization": TaskSpec(
        _findings_summarization, "text only: summarize the findings into the impression", True
    ),
    "view_classification": TaskSpec(_view_classification, "PA or AP view"),
    "binary_disease_classification": TaskSpec(
        _binary_disease, "yes/no for one CheXpert observation (positive/negative labels only)"
    ),
    "single_disease_identification": TaskSpec(
        _single_disease, "pick the one present finding among negative distractors"
    ),
    "multi_disease_identification": TaskSpec(
        _multi_disease, "pick the exact set of present findings from a panel"
    ),
    "location_vqa": TaskSpec(_location_vqa, "phantoms: side of a finding, lobe of consolidation"),
    "severity_vqa": TaskSpec(_severity_vqa, "phantoms: size of effusion/pneumothorax, edema grade"),
    "image_text_reasoning": TaskSpec(
        _image_text_reasoning, "phantoms: pick the true statement among one-word hard negatives"
    ),
}


def build_tasks(
    studies: Sequence[Study], *, seed: int = 0, tasks: Sequence[str] | None = None
) -> list[TaskRecord]:
    """Records for every study and task (default: all of TASKS), study by study."""
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS)}")
    seen: set[str] = set()
    records = []
    for study in studies:
        if study.id in seen:
            raise ValueError(f"duplicate study id {study.id!r}: record ids would collide")
        seen.add(study.id)
        for name in names:
            spec = TASKS[name]
            rng = random.Random(f"{seed}:{name}:{study.id}")
            for k, item in enumerate(spec.build(study, rng)):
                records.append(
                    TaskRecord(
                        id=f"{study.id}:{name}:{k}",
                        task=name,
                        images=[] if spec.text_only else [study.image],
                        prompt=item.prompt,
                        answer=item.answer,
                        split=study.split,
                        source=study.source,
                        options=item.options,
                    )
                )
    logger.info("built %d task records from %d studies", len(records), len(seen))
    return records


def _quotas(weights: dict[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding: quotas proportional to weights that sum exactly to total."""
    scale = total / sum(weights.values())
    exact = {k: w * scale for k, w in weights.items()}
    quotas = {k: int(v) for k, v in exact.items()}
    short = total - sum(quotas.values())
    for k in sorted(exact, key=lambda k: (quotas[k] - exact[k], k))[:short]:
        quotas[k] += 1
    return quotas


def task_mix(
    records: Sequence[TaskRecord],
    ratios: dict[str, float],
    seed: int = 0,
    *,
    total: int | None = None,
    by: str = "task",
) -> list[TaskRecord]:
    """Sample `total` records (default: all records of the weighted groups) so that each group
    (a task, or a source with by="source") makes up its share of `ratios` (relative weights).

    Groups with no weight are dropped. A group asked for more than it has is repeated whole
    and topped up at random (upsampling: the same record, same id, appears more than once).
    """
    if by not in ("task", "source"):
        raise ValueError(f"by must be 'task' or 'source', got {by!r}")
    if any(not w >= 0 for w in ratios.values()):
        raise ValueError(f"ratios must be non-negative numbers, got {ratios}")
    weights = {k: float(w) for k, w in ratios.items() if w > 0}
    if not weights:
        raise ValueError("ratios need at least one positive weight")
    groups: dict[str, list[TaskRecord]] = {k: [] for k in weights}
    for record in records:
        key = getattr(record, by)
        if key in groups:
            groups[key].append(record)
    empty = sorted(k for k, group in groups.items() if not group)
    if empty:
        raise ValueError(f"no records for {by} {empty}")
    if total is None:
        total = sum(len(group) for group in groups.values())
    rng = random.Random(f"task_mix:{seed}")
    mixed = []
    for key, quota in sorted(_quotas(weights, total).items()):
        pool = groups[key]
        repeats, rest = divmod(quota, len(pool))
        if repeats:
            logger.info("task mix: %s %r upsampled %.2fx", by, key, quota / len(pool))
        mixed += pool * repeats + rng.sample(pool, rest)
    rng.shuffle(mixed)
    return mixed


def holdout(
    records: Iterable[TaskRecord], *, tasks: Iterable[str] = (), sources: Iterable[str] = ()
) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """(kept, held_out): held out are records of any of `tasks` or from any of `sources`."""
    tasks, sources = set(tasks), set(sources)
    kept, held = [], []
    for record in records:
        (held if record.task in tasks or record.source in sources else kept).append(record)
    return kept, held


def write_tasks(path: str | Path, records: Iterable[TaskRecord]) -> int:
    return write_jsonl(path, (r.to_dict() for r in records))


def read_tasks(path: str | Path) -> list[TaskRecord]:
    records = []
    for n, row in enumerate(read_jsonl(path), 1):
        try:
            records.append(TaskRecord.from_dict(row))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: record {n}: {e}") from None
    return records
