"""The report labeler's tables: mentions per observation, exclusions, descriptive anatomy,
cues (uncertainty, negation, hedges), pseudo-negations, clause boundaries and report sections.
Their conventions and scopes are described in cxrlite.eval.labeler, which applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxrlite.data.labels import POSITIVE, UNCERTAIN
from cxrlite.eval.guarded_regex import GuardedRegex as _Rx
from cxrlite.eval.guarded_regex import rx as _rx

OTHER = "_other"  # an abnormality outside the 14 observations: only blocks No Finding


# ---- mentions ------------------------------------------------------------------------------

# (observation, pattern, base value). The base is what an un-negated, un-hedged mention means.
MENTIONS: list[tuple[str, _Rx, str]] = [
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
        OTHER,
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
EXCLUSIONS: dict[str, _Rx] = {
    "Pleural Effusion": _rx(r"\bpericardial effusions?\b"),
    "Lung Lesion": _rx(
        r"\b(lytic|sclerotic|blastic|osseous|bone|bony|skin"
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
class Descriptor:
    """Anatomy that is only a finding through its modifier ("heart size is normal")."""

    observations: tuple[str, ...]
    pattern: _Rx
    negative: _Rx
    positive: _Rx | None
    uncertain: _Rx | None


_NORMAL = r"normal|unremarkable|within normal limits|(at |within )?(the )?upper limits? of normal|top[- ]normal|upper normal"
_STABLE = r"stable|unchanged|similar|borderline|difficult to (assess|evaluate)|not well (assessed|evaluated)|poorly (assessed|evaluated)|cannot be (assessed|evaluated)|obscured"
DESCRIPTORS: list[Descriptor] = [
    Descriptor(
        ("Cardiomegaly",),
        _rx(
            r"\b(heart( size)?|cardiac (silhouette|size|contours?|shadow)|size of the (heart|cardiac silhouette)"
            r"|cardiac and mediastinal (silhouettes?|contours?))\b(?! failure)"
        ),
        _rx(rf"\b({_NORMAL}|not (\w+ly )?(enlarged|increased))\b"),
        _rx(r"\b(enlarg\w*|increased)\b"),
        _rx(rf"\b({_STABLE})\b"),
    ),
    Descriptor(
        ("Enlarged Cardiomediastinum",),
        _rx(
            r"\b(cardio)?mediastin(al|um)\b( and hilar)?( (contours?|silhouettes?|configuration|shadow|width))?"
            r"|\bhil(ar|um|a)( and mediastinal)? (contours?|silhouettes?)\b"
        ),
        _rx(rf"\b({_NORMAL}|not (\w+ly )?(widened|enlarged))\b"),
        _rx(r"\b(widen\w*|enlarg\w*)\b"),
        _rx(rf"\b({_STABLE})\b"),
    ),
    Descriptor(
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
    Descriptor(
        ("Pleural Effusion",),
        _rx(r"\bcostophrenic (angles?|sulc(us|i))\b"),
        _rx(r"\b(sharp|clear|normal|preserved)\b"),
        None,
        _rx(r"\bblunt\w*"),
    ),
]
CARDIOMEDIASTINAL = _rx(r"^cardiomediastin")
CLEAR_LUNGS = _rx(
    r"\blungs?\b( \w+){0,2} (is|are|remains?|appears?)( \w+){0,3} clear\b|\bclear lungs?\b"
    r"|\blungs? (otherwise )?clear\b"
)


@dataclass(frozen=True)
class Mention:
    observation: str
    start: int
    end: int
    base: str


# ---- triggers ------------------------------------------------------------------------------

_HEDGE_WORDS = (
    r"possible|possibly|probable|probably|less likely|unlikely|questionable|question of|questioned"
    r"|suspect\w*|suspicious|suspicion|concern(ing)? for|worrisome|may|might|could|would"
    r"|consider\w*|differential|presum\w*|equivocal|indeterminate|maybe|perhaps"
    r"|favor\w*|correlat\w*|potential|potentially|unclear|uncertain|whether|cannot be determined"
)
# How far a hedge reaches forward, in words: it modifies what follows it, not a later clause's
# finding ("Possibly small effusion" yes; "could be positional, with mild edema" no).
HEDGE_REACH = 6
_GRADES = r"mild|mildly|moderate|moderately|severe|severely|small|large|trace|minimal|marked"
# Forward triggers act on mentions after them, backward ones on mentions before them.
UNCERTAIN_FIRST_FWD = _rx(
    r"\b(cannot|can not|can't|could not|unable to)( (entirely|completely|definitely))? (exclude|rule out)\b"
    r"|\bno new\b|\bdifficult to exclude\b"
)
UNCERTAIN_FIRST_BWD = _rx(
    r"\b(cannot|can not|can't|could not)( be)?( (entirely|completely|definitely))? (excluded|ruled out)\b"
    r"|\bnot( be)?( (entirely|completely|definitely))? (excluded|ruled out)\b"
)
IGNORE_FWD = _rx(r"\b(rule out|r/o|evaluate for|evaluation for|eval for|assess for|to exclude)\b")
NEGATION_FWD = _rx(
    r"\bno\b|\bwithout\b|\bfree of\b|\bnegative for\b|\babsence of\b|\bresolution of\b"
    r"|\bremoval of\b|\brather than\b|\bclear(ing)? of\b|\bneither\b|\bnor\b"
)
NEGATION_BWD = _rx(
    r"\bno longer \w+|\bnot (\w+ly )?(seen|identified|present|demonstrated|evident|detected|noted"
    r"|appreciated|apparent|visible)\b|\b(resolved|cleared)\b|\bremoved\b|\babsent\b"
    r"|\b(is|are|was|were) excluded\b"
)
# "resolved" as an adjective: only the mention right after it ("resolved left consolidation").
NEGATION_NEAR = _rx(r"\bresolved( \w+){0,3} $")
HEDGE_FWD = _rx(rf"\b({_HEDGE_WORDS})\b")
NEW_BEFORE = _rx(r"\bnew( \w+){0,2} $")
HEDGE_BWD = _rx(
    # "effusion is likely (present)" hedges the effusion; "opacities are likely atelectasis"
    # hedges only the atelectasis, which the forward "likely" covers.
    r"\b(is|are)( also)? (possible|probable|suspected|questioned|favored|considered|questionable"
    r"|less likely|a consideration)\b(?=\s*$|\s+(present|given|due|related|secondary|over|in|on"
    r"|at|but|and)\b)"
    r"|\b(is|are|was|were)( also)? (possibly|probably|questionably|perhaps|potentially)\b"
    r"|\b(may|might|could)( also| still)? be( \w+ly)? (present|seen|noted|there|enlarged|widened"
    r"|increased|prominent)\b"
    r"|\bnot (well )?(seen|visualized|evaluated|assessed)\b(?! (and|or)\b)"
    r"|\b(poorly|incompletely) (evaluated|assessed|visualized)\b"
)
ALTERNATIVE_BEFORE = _rx(r"\b(or|versus|vs)\b[\s,]*(\w+[\s,]+){0,3}$")
ALTERNATIVE_AFTER = _rx(r"^[\s,]*(or|versus|vs)\b")

# Pseudo-negations: "no change in the effusion" says the effusion is still there.
PSEUDO = [
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
PARENTHETICAL = _rx(r",\s*however,\s*(?=(is|are|was|were|has|have|remains?|appears?)\b)")
# Clause ends: negation and hedges do not reach across these.
HARD_BOUNDARY = _rx(
    r";|:|\b(but|however|although|though|whereas|while|which|except|aside from|apart from"
    r"|other than|besides|with the exception of)\b|,\s*(?=(and )?(there|the|this|these|it)\b)"
    r"|\band (?=(there|the)\b)|\b(is|are|was|were) (seen|identified|present|noted|demonstrated"
    r"|evident|appreciated)\b"
)
# Where a new assertion may start: a hedge or a graded finding after a comma or "and" ("No
# pneumothorax, possible small effusion"; "No effusion and moderate cardiomegaly"). Not inside a
# negated list that goes on to its "or" item: "No focal consolidation, suspicious opacity, large
# effusion, or pneumothorax is seen" negates all four (the negation governs the whole list).
SOFT_BOUNDARY = _rx(
    rf",\s*(?=({_HEDGE_WORDS})\b)|(,|\band)\s*(?=(a |an )?({_GRADES})\b)"
    r"|\band (?=(stable|persistent|unchanged|increased|decreased|enlarged|worsening|improving)\b)"
)
LIST_GOES_ON = _rx(r"\b(or|nor)\b")

SECTION = _rx(
    r"\b(findings|impression|indication|history|clinical history|clinical information|reason for"
    r" (exam|examination|study)|comparisons?|technique|examination|exam|procedure|conclusions?"
    r"|recommendations?|notification|wet read|final report|addendum)\s*:"
)
SKIPPED_SECTIONS = {
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
