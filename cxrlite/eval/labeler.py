"""Rule-based CheXpert labeler: report text -> the 14 CheXpert observations.

Hand-written on purpose: no maintained pip package labels reports offline. The Stanford
CheXpert labeler needs NegBio, a BLLIP parser model and Stanford CoreNLP (Java) downloads;
CheXbert and VisualCheXbert need BERT weights from a model hub; negspacy needs a spaCy model.
This module follows the CheXpert labeler's three stages (mention extraction, classification,
aggregation), its phrase lists and its order of rules -- pre-negation uncertainty ("cannot
exclude", "not ruled out", "no new"), then negation, then uncertainty -- but replaces the
dependency parse with NegEx-style trigger scopes bounded by clauses ("but", "however", ";",
"which", ...). Values are positive / negative / uncertain / not mentioned.

Scopes (what a cue governs), as the CheXpert labeler's dependency parse would read them:
- A negation ("no", "without", "negative for", ...) governs the whole coordinated list it
  introduces, up to a clause end ("but", "however", ";", a new clause): size and hedge words
  inside the list ("no focal consolidation, suspicious opacity, large effusion, or
  pneumothorax") do not break it. Outside a negated list, ", possible ..." or "and moderate ..."
  start a new assertion.
- A hedge governs what it modifies: the next few words after it (`HEDGE_REACH`, labeler_rules), or the
  finding just before a backward hedge ("effusion is questionable", "may be present").
- Pseudo-negations ("no change in", "not only", "without change") and change words are
  rewritten first: "no change in the effusion" asserts the effusion.

Conventions (where the CheXpert labeler is silent or where we depart from it, on purpose; the
test corpus tests/data/labeler_corpus.md lists each with its reason):
- Descriptive anatomy ("heart size", "cardiac silhouette", "mediastinal / hilar contours",
  "pulmonary vasculature", "costophrenic angles") counts only with a modifier: enlarged /
  widened -> positive; normal / unremarkable / within normal limits / not enlarged -> negative;
  stable / unchanged / borderline -> uncertain (CheXpert's rule); no modifier -> not mentioned.
- A normal *cardiomediastinal* silhouette is negative for both Enlarged Cardiomediastinum and
  Cardiomegaly; an enlarged one is positive for Enlarged Cardiomediastinum only.
- "The lungs are clear" / "clear lungs" -> Lung Opacity negative.
- "No change in the moderate right effusion" -> positive; "partially resolved" -> positive.
- Vascular congestion / redistribution / cephalization / blunted costophrenic angle ->
  uncertain Edema / Pleural Effusion; "CHF" / "heart failure" also make Cardiomegaly uncertain.
- "likely", "suggestive of", "consistent with" assert (CheXpert lists only "less likely");
  "possible", "may", "questionable", "cannot be excluded", "versus", "or" are uncertain.
- "X is not seen / identified / appreciated" -> negative.
- "rule out" / "evaluate for" and the INDICATION / HISTORY / COMPARISON / TECHNIQUE sections
  state nothing about this study: their mentions are ignored (CheXpert negates "rule out").
- No Finding is positive iff no observation other than Support Devices is positive or
  uncertain and no other abnormality (emphysema, calcification, degenerative change, ...)
  is asserted -- CheXpert's rule; an empty report is all "not mentioned".
- As CheXpert: "no new consolidation" -> uncertain, also inside a negated list; "atelectasis
  or / versus pneumonia" -> both uncertain; "airspace disease" -> Lung Opacity (not
  Consolidation); "nodular opacity" -> Lung Lesion and Lung Opacity; "tip not visualized" ->
  uncertain. Beyond its phrase lists: "pleural air collection" is a pneumothorax, a
  "calcified nodule" and "fibronodular" change a lung lesion, "hydropneumothorax" an effusion
  too.
- Aggregation over mentions: positive beats uncertain beats negative.

Why no library: medspaCy's ConText (the maintained clinical NegEx/ConText on PyPI) brings spaCy
and a token pipeline per report onto the request path, and has no CheXpert observation
vocabulary (its target rules would be these tables again); its trigger and pseudo-negation
lists, and NegEx's, were read when writing `PSEUDO` and the cue tables (labeler_rules).
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
from cxrlite.eval.labeler_rules import (
    ALTERNATIVE_AFTER,
    ALTERNATIVE_BEFORE,
    CARDIOMEDIASTINAL,
    CLEAR_LUNGS,
    DESCRIPTORS,
    EXCLUSIONS,
    HARD_BOUNDARY,
    HEDGE_BWD,
    HEDGE_FWD,
    HEDGE_REACH,
    IGNORE_FWD,
    LIST_GOES_ON,
    MENTIONS,
    NEGATION_BWD,
    NEGATION_FWD,
    NEGATION_NEAR,
    NEW_BEFORE,
    PARENTHETICAL,
    PSEUDO,
    SECTION,
    SKIPPED_SECTIONS,
    SOFT_BOUNDARY,
    UNCERTAIN_FIRST_BWD,
    UNCERTAIN_FIRST_FWD,
    Descriptor,
    Mention,
)

__all__ = ["Decision", "explain_report", "label_report", "label_reports"]

_RANK = {NEGATIVE: 0, UNCERTAIN: 1, POSITIVE: 2}


# ---- text -> sentences -> clauses ----------------------------------------------------------


def _labelled_text(text: str) -> str:
    """The report, lower-cased, without the sections that say nothing about this study
    (indication, ...)."""
    text = text.lower()
    kept, pos, skipping = [], 0, False
    for m in SECTION.finditer(text):
        if not skipping:
            kept.append(text[pos : m.start()])
        skipping = m.group(1).lower() in SKIPPED_SECTIONS
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
    for pattern, replacement in PSEUDO:
        text = pattern.sub(replacement, text)
    # "the cardiac silhouette, however, is enlarged": a parenthetical, not a clause end
    text = PARENTHETICAL.sub(" ", text)
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
    for part in _split(sentence, HARD_BOUNDARY.finditer(sentence)):
        negation = NEGATION_FWD.search(part)
        cuts = [
            m
            for m in SOFT_BOUNDARY.finditer(part)
            if not (negation and negation.end() <= m.start() and LIST_GOES_ON.search(part, m.end()))
        ]
        clauses.extend(_split(part, cuts))
    return [c for c in clauses if c.strip()]


# ---- mention extraction ----------------------------------------------------------------------


def _excluded(observation: str, start: int, end: int, clause: str) -> bool:
    pattern = EXCLUSIONS.get(observation)
    return pattern is not None and any(
        m.start() <= start and end <= m.end() for m in pattern.finditer(clause)
    )


def _descriptor_value(descriptor: Descriptor, clause: str, start: int, end: int) -> str | None:
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


def _mentions(clause: str) -> list[Mention]:
    found: list[Mention] = []
    for observation, pattern, base in MENTIONS:
        for m in pattern.finditer(clause):
            if not _excluded(observation, m.start(), m.end(), clause):
                found.append(Mention(observation, m.start(), m.end(), base))
    for descriptor in DESCRIPTORS:
        for m in descriptor.pattern.finditer(clause):
            value = _descriptor_value(descriptor, clause, m.start(), m.end())
            if value is None:
                continue
            names = descriptor.observations
            if value == NEGATIVE and CARDIOMEDIASTINAL.match(m.group(0)):
                names += ("Cardiomegaly",)
            found.extend(Mention(name, m.start(), m.end(), value) for name in names)
    return sorted(found, key=lambda x: (x.start, x.end))


# ---- classification --------------------------------------------------------------------------


def _alternatives(clause: str, mentions: list[Mention]) -> set[int]:
    """Indexes of mentions offered as alternatives: "atelectasis or pneumonia", "A versus B"."""
    chosen = {
        i
        for i, m in enumerate(mentions)
        if ALTERNATIVE_BEFORE.search(clause[: m.start]) or ALTERNATIVE_AFTER.search(clause[m.end :])
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
    "uncertain-first": (UNCERTAIN_FIRST_FWD, UNCERTAIN_FIRST_BWD),
    "ignored": (IGNORE_FWD, None),
    "negation": (NEGATION_FWD, NEGATION_BWD),
    "hedge": (HEDGE_FWD, HEDGE_BWD),
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

    def before(self, name: str, mention: Mention, reach: int | None = None) -> str | None:
        """The nearest forward cue ending before the mention (at most `reach` words before)."""
        for m in reversed(self.found[(name, "fwd")]):
            if m.end() <= mention.start:
                if reach is not None and len(self.clause[m.end() : mention.start].split()) > reach:
                    return None
                return m.group(0)
        return None

    def after(self, name: str, mention: Mention) -> str | None:
        return next(
            (m.group(0) for m in self.found[(name, "bwd")] if m.start() >= mention.end), None
        )


def _classify(
    mention: Mention, cues: _Cues, alternative: bool
) -> tuple[str | None, str, str | None]:
    """(value or None when the mention says nothing about this study, rule, cue)."""
    cue = cues.before("uncertain-first", mention) or cues.after("uncertain-first", mention)
    if cue:
        return UNCERTAIN, "uncertain-first", cue
    cue = cues.before("ignored", mention)
    if cue:
        return None, "ignored", cue
    near = NEGATION_NEAR.search(cues.clause[: mention.start])
    cue = (near and near.group(0)) or cues.before("negation", mention)
    cue = cue or cues.after("negation", mention)
    if cue:
        # CheXpert's "no new X", also inside a list: an old X may still be there
        if NEW_BEFORE.search(cues.clause[: mention.start]):
            return UNCERTAIN, "uncertain-first", f"{cue} ... new"
        return NEGATIVE, "negation", cue
    if mention.base == NEGATIVE:
        return NEGATIVE, "descriptor", None
    cue = cues.before("hedge", mention, reach=HEDGE_REACH) or cues.after("hedge", mention)
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
    clear = CLEAR_LUNGS.search(sentence)
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


def forget_sentences() -> None:
    """Empty the sentence cache (benchmarks time the labeler on sentences it has not seen)."""
    _sentence_decisions.cache_clear()


def label_reports(texts: Iterable[str]) -> list[dict[str, str]]:
    return [label_report(text) for text in texts]
