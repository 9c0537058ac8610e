"""Structured ground truth of a study and the CheXpert observation vocabulary.

`StudyLabels` is what the phantom generator samples and draws; reports are written from it, and
`cxrlite.phantoms.reports.chexpert_truth(labels)` is the 14-observation truth the labeler and `eval`
score against.
Real datasets carry only the 14 CheXpert labels (see `records.Study.chexpert`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# Spelled exactly as CheXpert spells them, in CheXpert's order.
CHEXPERT_OBSERVATIONS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
POSITIVE = "positive"
NEGATIVE = "negative"
UNCERTAIN = "uncertain"
NOT_MENTIONED = "not mentioned"
LABEL_VALUES: tuple[str, ...] = (POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED)

# The five findings that the quality targets (macro-F1) are measured on.
CORE_FINDINGS: tuple[str, ...] = (
    "Cardiomegaly",
    "Pleural Effusion",
    "Pneumothorax",
    "Consolidation",
    "Edema",
)

Side = Literal["left", "right"]
SideOrBoth = Literal["left", "right", "bilateral"]
SIDES: tuple[str, ...] = ("left", "right")
EFFUSION_SIZES: tuple[str, ...] = ("small", "moderate", "large")
PNEUMOTHORAX_SIZES: tuple[str, ...] = ("small", "large")
EDEMA_SEVERITIES: tuple[str, ...] = ("mild", "moderate", "severe")
LOBES: tuple[str, ...] = (
    "right upper lobe",
    "right middle lobe",
    "right lower lobe",
    "left upper lobe",
    "lingula",
    "left lower lobe",
)
ZONES: tuple[str, ...] = ("upper", "mid", "lower")
DEVICES: tuple[str, ...] = ("endotracheal tube", "central venous catheter", "pacemaker")
VIEWS: tuple[str, ...] = ("PA", "AP")
SEXES: tuple[str, ...] = ("F", "M")
MASS_MIN_MM = 30  # radiology convention: a lesion of 3 cm or more is a mass, smaller a nodule
CARDIOMEGALY_CTR = 0.5  # cardiothoracic ratio above which the heart is enlarged (PA film)


def lobe_side(lobe: str) -> str:
    return "right" if lobe.startswith("right") else "left"


@dataclass(frozen=True)
class Effusion:
    side: SideOrBoth
    size: str  # EFFUSION_SIZES


@dataclass(frozen=True)
class Pneumothorax:
    side: Side
    size: str  # PNEUMOTHORAX_SIZES


@dataclass(frozen=True)
class Consolidation:
    lobe: str  # LOBES


@dataclass(frozen=True)
class Nodule:
    side: Side
    zone: str  # ZONES
    size_mm: int

    @property
    def is_mass(self) -> bool:
        return self.size_mm >= MASS_MIN_MM


@dataclass(frozen=True)
class Edema:
    severity: str  # EDEMA_SEVERITIES


@dataclass(frozen=True)
class Atelectasis:
    side: SideOrBoth  # basilar (lower zone) atelectasis


_PARTS = {
    "effusion": Effusion,
    "pneumothorax": Pneumothorax,
    "consolidation": Consolidation,
    "nodule": Nodule,
    "edema": Edema,
    "atelectasis": Atelectasis,
}


@dataclass(frozen=True)
class StudyLabels:
    """Everything that is true of one phantom study. None means the finding is absent."""

    view: str  # VIEWS
    sex: str  # SEXES
    age: int
    ctr: float  # true cardiothoracic ratio as drawn (AP magnification included)
    effusion: Effusion | None = None
    pneumothorax: Pneumothorax | None = None
    consolidation: Consolidation | None = None
    nodule: Nodule | None = None
    edema: Edema | None = None
    atelectasis: Atelectasis | None = None
    devices: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {self.view!r}")
        if self.sex not in SEXES:
            raise ValueError(f"sex must be one of {SEXES}, got {self.sex!r}")
        unknown = set(self.devices) - set(DEVICES)
        if unknown:
            raise ValueError(f"unknown devices {sorted(unknown)}")

    @property
    def cardiomegaly(self) -> bool:
        return self.ctr > CARDIOMEGALY_CTR

    @property
    def is_normal(self) -> bool:
        """No pathology (devices do not count, as in CheXpert's No Finding)."""
        return not (
            self.cardiomegaly
            or self.effusion
            or self.pneumothorax
            or self.consolidation
            or self.nodule
            or self.edema
            or self.atelectasis
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["devices"] = list(self.devices)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyLabels:
        kw = dict(d)
        for name, part in _PARTS.items():
            if kw.get(name) is not None:
                kw[name] = part(**kw[name])
        kw["devices"] = tuple(kw.get("devices", ()))
        return cls(**kw)


def age_band(age: int | None) -> str:
    """Age bands used for fairness breakdowns (CheXagent reports 0-20, 20-40, ...)."""
    if age is None:
        return "unknown"
    lo = min(max(age, 0) // 20 * 20, 80)
    return f"{lo}+" if lo == 80 else f"{lo}-{lo + 19}"
