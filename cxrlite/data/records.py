"""The two record formats every data source is turned into.

`Study`: one radiograph with its report and labels (phantoms, MIMIC-CXR-JPG, CheXpert, IU X-ray,
PadChest, generic JSONL all load into it). `TaskRecord`: one instruction example (CheXinstruct
style) that stage 3 trains on and `eval` scores. Both are stored as JSONL, one object a line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, LABEL_VALUES, StudyLabels

SPLITS: tuple[str, ...] = ("train", "validate", "test")


@dataclass
class Study:
    id: str
    image: str  # path; relative paths are relative to the manifest's folder
    split: str
    source: str  # "phantom", "mimic-cxr-jpg", "chexpert", "iu-xray", "padchest", "jsonl"
    findings: str | None = None
    impression: str | None = None
    chexpert: dict[str, str] = field(default_factory=dict)  # observation -> LABEL_VALUES
    view: str | None = None  # "PA" / "AP" / "LATERAL" / None
    sex: str | None = None  # "F" / "M" / None
    age: int | None = None
    labels: StudyLabels | None = None  # structured truth (phantoms only)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"study {self.id}: split must be one of {SPLITS}, got {self.split!r}")
        for name, value in self.chexpert.items():
            if name not in CHEXPERT_OBSERVATIONS:
                raise ValueError(f"study {self.id}: unknown CheXpert observation {name!r}")
            if value not in LABEL_VALUES:
                raise ValueError(
                    f"study {self.id}: {name} has value {value!r}, not one of {LABEL_VALUES}"
                )

    @property
    def report(self) -> str:
        parts = []
        if self.findings:
            parts.append(f"FINDINGS: {self.findings}")
        if self.impression:
            parts.append(f"IMPRESSION: {self.impression}")
        return "\n".join(parts)

    @property
    def narrative(self) -> str:
        """Findings and impression as one running text, without section headers: the form the
        LLM is trained on in stage 0, so perplexity is measured on the same kind of text."""
        return " ".join(part for part in (self.findings, self.impression) if part)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = self.labels.to_dict() if self.labels else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Study:
        kw = dict(d)
        if kw.get("labels") is not None:
            kw["labels"] = StudyLabels.from_dict(kw["labels"])
        return cls(**kw)


@dataclass
class TaskRecord:
    id: str
    task: str  # e.g. "findings_generation", "view_classification" (see cxrlite.data.tasks.TASKS)
    images: list[str]  # empty for text-only tasks (findings summarization)
    prompt: str
    answer: str
    split: str
    source: str
    options: list[str] | None = None  # multiple choice: the answer is one of these

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"task {self.id}: split must be one of {SPLITS}, got {self.split!r}")
        if self.options is not None and self.answer not in self.options:
            raise ValueError(f"task {self.id}: answer {self.answer!r} is not among its options")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRecord:
        return cls(**d)
