"""Rule-based CheXpert labeler: report text -> the 14 CheXpert observations.

Hand-written on purpose: no maintained pip package labels reports offline. The Stanford
CheXpert labeler needs NegBio, a BLLIP parser model and Stanford CoreNLP (Java) downloads;
CheXbert and VisualCheXbert need BERT weights from a model hub; negspacy needs a spaCy model.
This module follows the CheXpert labeler's three stages (mention extraction, classification,
aggregation), its phrase lists and its order of rules -- pre-negation uncertainty ("cannot
exclude", "not ruled out", "no new"), then negation, then uncertainty -- but replaces the
dependency parse with NegEx-style trigger scopes bounded by clauses ("but", "however", ";",
"which", ...). Values are positive / negative / uncertain / not mentioned.

Conventions (where the CheXpert labeler is silent or where we depart from it, on purpose):
- Descriptive anatomy ("heart size", "cardiac silhouette", "mediastinal contours",
  "pulmonary vasculature", "costophrenic angles") counts only with a modifier: enlarged /
  widened -> positive; normal / unremarkable / within normal limits / not enlarged -> negative;
  stable / unchanged / borderline -> uncertain (CheXpert's rule); no modifier -> not mentioned.
- A normal *cardiomediastinal* silhouette is negative for both Enlarged Cardiomediastinum and
  Cardiomegaly; an enlarged one is positive for Enlarged Cardiomediastinum only.
- "The lungs are clear" / "clear lungs" -> Lung Opacity negative.
- "No change in the moderate right effusion" -> positive; "partially resolved" -> positive.
- Vascular congestion / redistribution / blunted costophrenic angle -> uncertain Edema /
  Pleural Effusion (as CheXpert); "CHF" / "heart failure" also make Cardiomegaly uncertain.
- "rule out" / "evaluate for" and the INDICATION / HISTORY / COMPARISON / TECHNIQUE sections
  state nothing about this study: their mentions are ignored (CheXpert negates "rule out").
- No Finding is positive iff no observation other than Support Devices is positive or
  uncertain and no other abnormality (emphysema, calcification, degenerative change, ...)
  is asserted -- CheXpert's rule; an empty report is all "not mentioned".
- As CheXpert: "no new consolidation" -> uncertain; "atelectasis or / versus pneumonia" ->
  both uncertain; "airspace disease" -> Lung Opacity (not Consolidation); "nodular opacity"
  -> Lung Lesion and Lung Opacity; "tip not visualized" -> uncertain.
- Aggregation over mentions: positive beats uncertain beats negative.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cxrlite.data.labels import (
    CHEXPERT_OBSERVATIONS,
    NEGATIVE,
    NOT_MENTIONED,
    POSITIVE,
    UNCERTAIN,
)

__all__ = ["Decision", "explain_report", "label_report", "label_reports"]

_OTHER = "_other"  # an abnormality outside the 14 observations: only blocks No Finding
_RANK = {NEGATIVE: 0, UNCERTAIN: 1, POSITIVE: 2}


def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)


# ---- mentions ------------------------------------------------------------------------------

# (observation, pattern, base value). The base is what an un-negated, un-hedged mention means.
_MENTIONS: list[tuple[str, re.Pattern[str], str]] = [
    ("Cardiomegaly", _rx(r"\bcardiomegaly\b|\bcardiac enlargement\b|\benlarged heart\b"), POSITIVE),
    (
        "Lung Opacity",
        _rx(
            r"\bopaci\w*|\binfiltrat\w*|\bair[- ]?space (disease|process)|\bincreased densit\w*"
            r"|\bdecreased translucency|\binterstitial (markings?|pattern|lung disease|abnormalit\w*)"
            r"|\breticula\w*|\breticulonodular|\bparenchymal scarring|\bscar(s|ring)?\b"
            r"|\bperibronchial (thickening|cuffing)|\bground[- ]glass|\bhaziness\b"
        ),
        POSITIVE,
    ),
    (
        "Lung Lesion",
        _rx(
            r"\bnodul\w*|\bfibronodular\b|\bmass(es)?\b|\btumou?rs?\b|\bneoplasms?\b|\bcarcinoma\b"
            r"|\blesions?\b|\blump\b"
        ),
        POSITIVE,
    ),
    ("Edema", _rx(r"\bedema\b|\bheart failure\b|\bchf\b|\bfluid overload\b"), POSITIVE),
    (
        "Edema",
        _rx(
            r"\b(vascular|venous|pulmonary) (congestion|engorgement|redistribution|prominence)"
            r"|\bcephalization\b|\bindistinctness\b|\bkerley b lines\b"
        ),
        UNCERTAIN,
    ),
    ("Consolidation", _rx(r"\bconsolidat\w*"), POSITIVE),
    ("Pneumonia", _rx(r"\b(broncho)?pneumonias?\b|\binfect\w*"), POSITIVE),
    ("Atelectasis", _rx(r"\batelecta\w*|\bcollapsed?\b"), POSITIVE),
    (
        "Pneumothorax",
        _rx(r"\b(hydro)?pneumothora(x|ces)\b|\bptx\b|\bpleural air( collection)?\b"),
        POSITIVE,
    ),
    (
        "Pleural Effusion",
        _rx(r"\beffusions?\b|\bpleural fluid\b|\bhydrothorax\b|\bhydropneumothorax\b"),
        POSITIVE,
    ),
    (
        "Pleural Effusion",
        _rx(
            r"\bblunt(ing|ed)? (of )?(both |the )?(\w+ )?costophrenic (angles?|sulc(us|i))"
            r"|\bcostophrenic (angles? )?blunting"
        ),
        UNCERTAIN,
    ),
    (
        "Pleural Other",
        _rx(
            r"\bpleural (thickening|plaques?|scar\w*)|\bfibrothorax\b"
            r"|\bpleuro-?parenchymal (scar\w*|thickening)|\bapical (pleural )?cap(ping)?\b"
        ),
        POSITIVE,
    ),
    ("Fracture", _rx(r"\bfractur\w*|\bfx\b"), POSITIVE),
    (
        "Support Devices",
        _rx(
            r"\btubes?\b|\bett\b|\bcatheters?\b|\bpacemakers?\b|\bpacers?\b|\bpicc\b|\ba?icd\b"
            r"|\bdefibrillators?\b|\bdevices?\b|\bdrains?\b|\bstents?\b|\bclips?\b|\bwires?\b"
            r"|\bleads?\b(?! to)|\bport-?a-?cath\b|\bmediport\b|\bport\b|\bhardware\b|\bcannula\b"
            r"|\bcoils?\b|\btracheostomy\b|\bvalve (replacement|prosthesis)|\bprosthetic \w* ?valve"
            r"|\bswan[- ]ganz\b|\b(central|venous|arterial|jugular|ij|subclavian|picc|midline|femoral"
            r"|dialysis|support|port|pa|swan[- ]ganz) (\w+ )?lines?\b|\blines and tubes\b"
        ),
        POSITIVE,
    ),
    (
        _OTHER,
        _rx(
            r"\bemphysema\w*|\bhyperinflat\w*|\bhyperexpan\w*|\bscoliosis\b|\bkyphosis\b|\bdegenera\w*"
            r"|\bcalcifi\w*|\bgranulomas?\b|\bhernia\w*|\beventration\b|\belevat\w*|\btortu\w*"
            r"|\batherosclero\w*|\bplaques?\b|\bbronchiectasis\b|\bthickening\b|\bprominen\w*"
            r"|\bpneumomediastinum\b|\bpneumoperitoneum\b|\baspiration\b|\bpericardial effusion"
            r"|\bdeformit\w*|\bvolume loss\b|\bhematoma\b|\bhemorrhage\b|\bmetasta\w*|\bosteopenia\b"
            r"|\bosteophyt\w*|\bcopd\b|\bbronchitis\b|\bbullae?\b|\bfibrosis\b|\bcavit\w*"
            r"|\blymphadenopathy\b|\badenopathy\b|\bcysts?\b|\bcardiomediastinal shift\b"
        ),
        POSITIVE,
    ),
]

# A mention inside one of these spans is not a mention of that observation.
_EXCLUSIONS: dict[str, re.Pattern[str]] = {
    "Pleural Effusion": _rx(r"\bpericardial effusions?\b"),
    "Lung Lesion": _rx(
        r"\bcalcified (\w+ )?nodul\w*|\b(lytic|sclerotic|blastic|osseous|bone|bony|skin"
        r"|cutaneous) lesions?\b|\bsoft tissue mass\w*"
    ),
    "Edema": _rx(r"\b(soft tissue|subcutaneous|chest wall) edema\b"),
    "Lung Opacity": _rx(r"\bpleural scar\w*"),
    "Atelectasis": _rx(r"\b(vertebral|compression|body) collapse\b"),
    "Support Devices": _rx(
        r"\bpleural lines?\b|\bkerley b lines\b|\bmidline\b(?! (\w+ )?(catheter|line))"
    ),
}


@dataclass(frozen=True)
class _Descriptor:
    """Anatomy that is only a finding through its modifier ("heart size is normal")."""

    observations: tuple[str, ...]
    pattern: re.Pattern[str]
    negative: re.Pattern[str]
    positive: re.Pattern[str] | None
    uncertain: re.Pattern[str] | None


_NORMAL = r"normal|unremarkable|within normal limits|(at |within )?(the )?upper limits? of normal|top[- ]normal|upper normal"
_STABLE = r"stable|unchanged|similar|borderline|difficult to (assess|evaluate)|not well (assessed|evaluated)|poorly (assessed|evaluated)|cannot be (assessed|evaluated)|obscured"
_DESCRIPTORS: list[_Descriptor] = [
    _Descriptor(
        ("Cardiomegaly",),
        _rx(
            r"\b(heart( size)?|cardiac (silhouette|size|contours?|shadow)|size of the (heart|cardiac silhouette)"
            r"|cardiac and mediastinal (silhouettes?|contours?))\b(?! failure)"
        ),
        _rx(rf"\b({_NORMAL}|not (\w+ly )?(enlarged|increased))\b"),
        _rx(r"\b(enlarg\w*|increased)\b"),
        _rx(rf"\b({_STABLE})\b"),
    ),
    _Descriptor(
        ("Enlarged Cardiomediastinum",),
        _rx(
            r"\b(cardio)?mediastin(al|um)\b( and hilar)?( (contours?|silhouettes?|configuration|shadow|width))?"
        ),
        _rx(rf"\b({_NORMAL}|not (\w+ly )?(widened|enlarged))\b"),
        _rx(r"\b(widen\w*|enlarg\w*)\b"),
        _rx(rf"\b({_STABLE})\b"),
    ),
    _Descriptor(
        ("Edema",),
        _rx(
            r"\bpulmonary (vascularity|vasculature|vessels|vascular markings)\b|\bvascular markings\b"
        ),
        _rx(rf"\b({_NORMAL}|not (engorged|congested|prominent))\b"),
        None,
        _rx(
            r"\b(engorge\w*|congest\w*|prominen\w*|cephaliz\w*|redistribut\w*|increased|indistinct\w*)\b"
        ),
    ),
    _Descriptor(
        ("Pleural Effusion",),
        _rx(r"\bcostophrenic (angles?|sulc(us|i))\b"),
        _rx(r"\b(sharp|clear|normal|preserved)\b"),
        None,
        _rx(r"\bblunt\w*"),
    ),
]
_CARDIOMEDIASTINAL = _rx(r"^cardiomediastin")
_CLEAR_LUNGS = _rx(
    r"\blungs?\b( \w+){0,2} (is|are|remains?|appears?)( \w+){0,3} clear\b|\bclear lungs?\b"
    r"|\blungs? (otherwise )?clear\b"
)


@dataclass(frozen=True)
class _Mention:
    observation: str
    start: int
    end: int
    base: str


# ---- triggers ------------------------------------------------------------------------------

_HEDGE_WORDS = (
    r"possible|possibly|probable|probably|likely|unlikely|questionable|question of|questioned"
    r"|suspect\w*|suspicious|suspicion|concern(ing)? for|worrisome|may|might|could|would"
    r"|suggest\w*|consider\w*|differential|presum\w*|equivocal|indeterminate|maybe|perhaps"
    r"|favor\w*|correlat\w*|potential|potentially|unclear|uncertain|whether|cannot be determined"
)
# How far a hedge reaches forward, in words: it modifies what follows it, not a later clause's
# finding ("Possibly small effusion" yes; "could be positional, with mild edema" no).
_HEDGE_REACH = 6
_GRADES = r"mild|mildly|moderate|moderately|severe|severely|small|large|trace|minimal|marked"
# Forward triggers act on mentions after them, backward ones on mentions before them.
_UNCERTAIN_FIRST_FWD = _rx(
    r"\b(cannot|can not|can't|could not|unable to)( (entirely|completely|definitely))? (exclude|rule out)\b"
    r"|\bno new\b|\bdifficult to exclude\b"
)
_UNCERTAIN_FIRST_BWD = _rx(
    r"\b(cannot|can not|can't|could not)( be)?( (entirely|completely|definitely))? (excluded|ruled out)\b"
    r"|\bnot( be)?( (entirely|completely|definitely))? (excluded|ruled out)\b"
)
_IGNORE_FWD = _rx(r"\b(rule out|r/o|evaluate for|evaluation for|eval for|assess for|to exclude)\b")
_NEGATION_FWD = _rx(
    r"\bno\b|\bwithout\b|\bfree of\b|\bnegative for\b|\babsence of\b|\bresolution of\b"
    r"|\bremoval of\b|\brather than\b|\bclear(ing)? of\b|\bneither\b|\bnor\b"
)
_NEGATION_BWD = _rx(
    r"\bno longer \w+|\bnot (\w+ly )?(seen|identified|present|demonstrated|evident|detected|noted"
    r"|appreciated|apparent|visible)\b|\b(resolved|cleared)\b|\bremoved\b|\babsent\b"
    r"|\b(is|are|was|were) excluded\b"
)
# "resolved" as an adjective: only the mention right after it ("resolved left consolidation").
_NEGATION_NEAR = _rx(r"\bresolved( \w+){0,3} $")
_HEDGE_FWD = _rx(rf"\b({_HEDGE_WORDS})\b")
_HEDGE_BWD = _rx(
    # "effusion is likely (present)" hedges the effusion; "opacities are likely atelectasis"
    # hedges only the atelectasis, which the forward "likely" covers.
    r"\b(is|are)( also)? (possible|likely|probable|suspected|questioned|favored|considered"
    r"|a consideration)\b(?=\s*$|\s+(present|given|due|related|secondary|over|in|on|at|but|and)\b)"
    r"|\b(is|are|was|were)( also)? (possibly|probably|likely|questionably|perhaps|potentially)\b"
    r"|\bnot (well )?(visualized|evaluated|assessed)\b"
    r"|\b(poorly|incompletely) (evaluated|assessed|visualized)\b"
)
_ALTERNATIVE_BEFORE = _rx(r"\b(or|versus|vs)\b[\s,]*(\w+[\s,]+){0,3}$")
_ALTERNATIVE_AFTER = _rx(r"^[\s,]*(or|versus|vs)\b")

# Pseudo-negations: "no change in the effusion" says the effusion is still there.
_PSEUDO = [
    (
        _rx(
            r"\b(no|without|not)( (\w+ly|significant|substantial|appreciable|interval|definite|major"
            r"|marked|obvious|notable))* (change|changes|changed|increase|decrease|improvement"
            r"|worsening|progression|difference)\b"
        ),
        "unchanged",
    ),
    (
        _rx(
            r"\b(partially|partly|nearly|almost|incompletely|largely|mostly|not (yet )?(completely"
            r"|fully|entirely)?) ?(resolved|resolving|cleared|clearing)\b"
        ),
        "improved",
    ),
    (_rx(r"\bpartial (resolution|clearing)\b"), "improvement"),
    (_rx(r"\bnot only\b"), "also"),
    (_rx(r"\band/or\b"), "or"),
]
# Clause ends: negation and hedges do not reach across these.
_HARD_BOUNDARY = _rx(
    r";|:|\b(but|however|although|though|whereas|while|which|except|aside from|apart from"
    r"|other than|besides|with the exception of)\b|,\s*(?=(and )?(there|the|this|these|it)\b)"
    r"|\band (?=(there|the)\b)|\b(is|are|was|were) (seen|identified|present|noted|demonstrated"
    r"|evident|appreciated)\b"
)
# Where a new assertion may start: a hedge or a graded finding after a comma or "and" ("No
# pneumothorax, possible small effusion"; "No effusion and moderate cardiomegaly"). Not inside a
# negated list that goes on to its "or" item: "No focal consolidation, suspicious opacity, large
# effusion, or pneumothorax is seen" negates all four (the negation governs the whole list).
_SOFT_BOUNDARY = _rx(
    rf",\s*(?=({_HEDGE_WORDS})\b)|(,|\band)\s*(?=(a |an )?({_GRADES})\b)"
    r"|\band (?=(stable|persistent|unchanged|increased|decreased|enlarged|worsening|improving)\b)"
)
_LIST_GOES_ON = _rx(r"\b(or|nor)\b")

_SECTION = _rx(
    r"\b(findings|impression|indication|history|clinical history|clinical information|reason for"
    r" (exam|examination|study)|comparisons?|technique|examination|exam|procedure|conclusions?"
    r"|recommendations?|notification|wet read|final report|addendum)\s*:"
)
_SKIPPED_SECTIONS = {
    "indication",
    "history",
    "clinical history",
    "clinical information",
    "reason for exam",
    "reason for examination",
    "reason for study",
    "comparison",
    "comparisons",
    "technique",
    "examination",
    "exam",
    "procedure",
}


# ---- text -> sentences -> clauses ----------------------------------------------------------


def _labelled_text(text: str) -> str:
    """The report without the sections that say nothing about this study (indication, ...)."""
    kept, pos, skipping = [], 0, False
    for m in _SECTION.finditer(text):
        if not skipping:
            kept.append(text[pos : m.start()])
        skipping = m.group(1).lower() in _SKIPPED_SECTIONS
        pos = m.end()
        kept.append(". ")
    if not skipping:
        kept.append(text[pos:])
    return "".join(kept)


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\bvs\.", "versus", text, flags=re.IGNORECASE)
    # Blank lines and numbered list items end sentences; single newlines are line wrapping.
    text = re.sub(r"\n\s*\n|\n\s*(?=\d+[.)]\s)", ". ", text)
    text = re.sub(r"\s+", " ", text).lower()
    for pattern, replacement in _PSEUDO:
        text = pattern.sub(replacement, text)
    parts = re.split(r"(?<=[.!?])\s+|\.(?=[a-z])", text)
    return [p.strip(" .!?") for p in parts if p.strip(" .!?")]


def _split(text: str, cuts: Iterable[re.Match[str]]) -> list[str]:
    parts, pos = [], 0
    for m in cuts:
        parts.append(text[pos : m.start()])
        pos = m.end()
    parts.append(text[pos:])
    return parts


def _clauses(sentence: str) -> list[str]:
    clauses = []
    for part in _split(sentence, _HARD_BOUNDARY.finditer(sentence)):
        negation = _NEGATION_FWD.search(part)
        cuts = [
            m
            for m in _SOFT_BOUNDARY.finditer(part)
            if not (
                negation and negation.end() <= m.start() and _LIST_GOES_ON.search(part, m.end())
            )
        ]
        clauses.extend(_split(part, cuts))
    return [c for c in clauses if c.strip()]


# ---- mention extraction ----------------------------------------------------------------------


def _excluded(observation: str, start: int, end: int, clause: str) -> bool:
    pattern = _EXCLUSIONS.get(observation)
    return pattern is not None and any(
        m.start() <= start and end <= m.end() for m in pattern.finditer(clause)
    )


def _descriptor_value(descriptor: _Descriptor, clause: str, start: int, end: int) -> str | None:
    """The value set by the modifier nearest the descriptor: just before it, else after it."""
    words_before = clause[:start].split()
    # "the heart and mediastinum are normal": a conjoined descriptor shares the modifier.
    n_before = 8 if words_before[-1:] == ["and"] else 4
    before = " ".join(words_before[-n_before:])
    after = " ".join(clause[end:].split(",")[0].split()[:8])
    tables = [
        (descriptor.negative, NEGATIVE),
        (descriptor.positive, POSITIVE),
        (descriptor.uncertain, UNCERTAIN),
    ]
    for window, pick_last in ((before, True), (after, False)):
        found = []
        for pattern, value in tables:
            if pattern is None:
                continue
            for m in pattern.finditer(window):
                found.append((m.start(), value))
        if found:
            found.sort()
            return found[-1][1] if pick_last else found[0][1]
    return None


# One pass that tells whether a clause mentions anything at all (most report clauses name an
# observation, many do not: "PA and lateral views of the chest were obtained").
_ANY_MENTION = _rx(
    "|".join(f"(?:{p.pattern})" for _, p, _ in _MENTIONS)
    + "|"
    + "|".join(f"(?:{d.pattern.pattern})" for d in _DESCRIPTORS)
)


def _mentions(clause: str) -> list[_Mention]:
    if not _ANY_MENTION.search(clause):
        return []
    found: list[_Mention] = []
    for observation, pattern, base in _MENTIONS:
        for m in pattern.finditer(clause):
            if not _excluded(observation, m.start(), m.end(), clause):
                found.append(_Mention(observation, m.start(), m.end(), base))
    for descriptor in _DESCRIPTORS:
        for m in descriptor.pattern.finditer(clause):
            value = _descriptor_value(descriptor, clause, m.start(), m.end())
            if value is None:
                continue
            names = descriptor.observations
            if value == NEGATIVE and _CARDIOMEDIASTINAL.match(m.group(0)):
                names += ("Cardiomegaly",)
            found.extend(_Mention(name, m.start(), m.end(), value) for name in names)
    return sorted(found, key=lambda x: (x.start, x.end))


# ---- classification --------------------------------------------------------------------------


def _alternatives(clause: str, mentions: list[_Mention]) -> set[int]:
    """Indexes of mentions offered as alternatives: "atelectasis or pneumonia", "A versus B"."""
    chosen = {
        i
        for i, m in enumerate(mentions)
        if _ALTERNATIVE_BEFORE.search(clause[: m.start])
        or _ALTERNATIVE_AFTER.search(clause[m.end :])
    }
    # "A, B, or C": the alternative spreads back over comma-joined list items.
    for i in sorted(chosen, reverse=True):
        j = i
        while j > 0 and re.fullmatch(r"[\s,]*", clause[mentions[j - 1].end : mentions[j].start]):
            j -= 1
            chosen.add(j)
    return chosen


@dataclass(frozen=True)
class Decision:
    """Why one mention got its value: the phrase matched, the rule and the cue that decided it
    (`cxrlite data label --explain`)."""

    observation: str
    value: str
    phrase: str
    rule: str  # plain, descriptor, negation, uncertain-first, hedge, alternative, ...
    cue: str | None
    clause: str


_CUES = {
    "uncertain-first": (_UNCERTAIN_FIRST_FWD, _UNCERTAIN_FIRST_BWD),
    "ignored": (_IGNORE_FWD, None),
    "negation": (_NEGATION_FWD, _NEGATION_BWD),
    "hedge": (_HEDGE_FWD, _HEDGE_BWD),
}


class _Cues:
    """Every trigger of one clause, found once for all its mentions."""

    def __init__(self, clause: str) -> None:
        self.clause = clause
        self.found = {
            (name, way): [m for m in pattern.finditer(clause)] if pattern else []
            for name, patterns in _CUES.items()
            for way, pattern in zip(("fwd", "bwd"), patterns, strict=True)
        }

    def before(self, name: str, mention: _Mention, reach: int | None = None) -> str | None:
        """The nearest forward cue ending before the mention (at most `reach` words before)."""
        for m in reversed(self.found[(name, "fwd")]):
            if m.end() <= mention.start:
                if reach is not None and len(self.clause[m.end() : mention.start].split()) > reach:
                    return None
                return m.group(0)
        return None

    def after(self, name: str, mention: _Mention) -> str | None:
        return next(
            (m.group(0) for m in self.found[(name, "bwd")] if m.start() >= mention.end), None
        )


def _classify(
    mention: _Mention, cues: _Cues, alternative: bool
) -> tuple[str | None, str, str | None]:
    """(value or None when the mention says nothing about this study, rule, cue)."""
    cue = cues.before("uncertain-first", mention) or cues.after("uncertain-first", mention)
    if cue:
        return UNCERTAIN, "uncertain-first", cue
    cue = cues.before("ignored", mention)
    if cue:
        return None, "ignored", cue
    near = _NEGATION_NEAR.search(cues.clause[: mention.start])
    cue = (near and near.group(0)) or cues.before("negation", mention)
    cue = cue or cues.after("negation", mention)
    if cue:
        return NEGATIVE, "negation", cue
    if mention.base == NEGATIVE:
        return NEGATIVE, "descriptor", None
    cue = cues.before("hedge", mention, reach=_HEDGE_REACH) or cues.after("hedge", mention)
    if cue:
        return UNCERTAIN, "hedge", cue
    if alternative:
        return UNCERTAIN, "alternative", "or / versus"
    return mention.base, "descriptor" if mention.base == UNCERTAIN else "plain", None


def explain_report(text: str) -> list[Decision]:
    """Every decision the labeler takes on one report, in reading order."""
    if not isinstance(text, str):
        raise TypeError(f"label_report expects report text (str), got {type(text).__name__}")
    decisions: list[Decision] = []
    for sentence in _sentences(_labelled_text(text)):
        decisions.extend(_sentence_decisions(sentence))
    return decisions


# Reports repeat their sentences ("No pneumothorax.", "The lungs are clear."), generated ones
# most of all: a sentence is labelled once and its decisions kept (they are immutable).
@functools.lru_cache(maxsize=8192)
def _sentence_decisions(sentence: str) -> tuple[Decision, ...]:
    decisions: list[Decision] = []
    # Matched on the whole sentence: "the lungs are hyperinflated but clear" spans a "but".
    clear = _CLEAR_LUNGS.search(sentence)
    if clear:
        decisions.append(
            Decision("Lung Opacity", NEGATIVE, clear.group(0), "clear lungs", None, sentence)
        )
    for clause in _clauses(sentence):
        decisions.extend(_clause_decisions(clause))
    return tuple(decisions)


def _clause_decisions(clause: str) -> list[Decision]:
    mentions = _mentions(clause)
    if not mentions:
        return []
    cues = _Cues(clause)
    alternatives = _alternatives(clause, mentions)
    out = []
    for i, mention in enumerate(mentions):
        value, rule, cue = _classify(mention, cues, i in alternatives)
        phrase = clause[mention.start : mention.end]
        out.append(Decision(mention.observation, value, phrase, rule, cue, clause))
        # CheXpert: a (possible) CHF or heart failure makes cardiomegaly uncertain.
        chf = re.fullmatch(r"chf|heart failure", phrase)
        if mention.observation == "Edema" and value not in (None, NEGATIVE) and chf:
            out.append(Decision("Cardiomegaly", UNCERTAIN, phrase, "heart failure", None, clause))
    return out


def label_report(text: str) -> dict[str, str]:
    """The 14 CheXpert observations of one report (FINDINGS and/or IMPRESSION text)."""
    found: dict[str, str] = {}
    for decision in explain_report(text):
        if decision.value is not None:
            found[decision.observation] = _stronger(found.get(decision.observation), decision.value)
    result = {name: found.get(name, NOT_MENTIONED) for name in CHEXPERT_OBSERVATIONS}
    if not found and not text.strip():
        return result
    finding = any(
        value in (POSITIVE, UNCERTAIN)
        for name, value in found.items()
        if name not in ("No Finding", "Support Devices")
    )
    result["No Finding"] = NOT_MENTIONED if finding else POSITIVE
    return result


def _stronger(old: str | None, new: str) -> str:
    """CheXpert aggregation: positive beats uncertain beats negative."""
    if old is None or _RANK[new] > _RANK[old]:
        return new
    return old


def label_reports(texts: Iterable[str]) -> list[dict[str, str]]:
    return [label_report(text) for text in texts]
