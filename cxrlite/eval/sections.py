"""Split a free-text radiology report into its sections (FINDINGS, IMPRESSION, ...).

Hand-written after the MIMIC-CXR section parser: no maintained pip package parses report
sections, and the rules are a few regular expressions over known headers (typos included).
"""

from __future__ import annotations

import re
from difflib import get_close_matches

# Section names as radiologists spell them, normalized (after the MIMIC-CXR section parser).
_SECTION_GROUPS = {
    "findings": ("findings", "finding"),
    "impression": (
        "impression", "impressions", "conclusion", "findings and impression",
        "findings/impression", "impression/findings",
    ),
    "comparison": ("comparison", "comparisons"),
    "indication": ("indication", "clinical indication", "reason for exam", "reason for examination"),
    "history": ("history", "clinical history", "clinical information"),
    "examination": ("examination", "exam", "type of examination"),
    "technique": ("technique",),
    "recommendations": ("recommendation", "recommendations", "recommendation(s)"),
    "notification": ("notification",),
    "addendum": ("addendum",),
    "wet read": ("wet read",),
}  # fmt: skip
_SECTION_ALIASES = {alias: name for name, group in _SECTION_GROUPS.items() for alias in group}
# Title-like headers ("PA AND LATERAL VIEWS OF THE CHEST:") describe the whole film: findings.
_FINDINGS_TITLE = re.compile(
    r"chest|portable|(pa|ap) and lat|two views|one view|frontal|(pa|ap) view"
)
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z ()/,&'-]{0,48}?)[ \t]*:", re.MULTILINE)


def _section_name(header: str) -> str | None:
    name = " ".join(header.lower().split())
    if name in _SECTION_ALIASES:
        return _SECTION_ALIASES[name]
    if not header.isupper():
        return None  # mixed-case text before a colon is prose, not a header
    for main in ("impression", "findings", "history", "comparison", "addendum"):
        if main in name:
            return main
    typo = get_close_matches(name, ("impression", "findings"), n=1, cutoff=0.8)
    if typo:
        return typo[0]
    return "findings" if _FINDINGS_TITLE.search(name) else None


def report_sections(text: str) -> dict[str, str]:
    """Split a free-text report into normalized sections (findings, impression, ...).

    Hand-written (no maintained library parses radiology sections): a header is a line start
    followed by a known section name and a colon. Unknown all-caps headers inside a section
    ("LUNGS:", "TUBES/LINES:") stay part of it rather than cutting the findings short.
    """
    matches = [(m, _section_name(m.group(1))) for m in _HEADER.finditer(text)]
    known = [(m, name) for m, name in matches if name is not None]
    sections: dict[str, str] = {}
    for i, (match, name) in enumerate(known):
        end = known[i + 1][0].start() if i + 1 < len(known) else len(text)
        body = " ".join(text[match.end() : end].split())
        if body:
            sections[name] = f"{sections[name]} {body}" if name in sections else body
    return sections


def findings_and_impression(text: str) -> tuple[str | None, str | None]:
    sections = report_sections(text)
    return sections.get("findings"), sections.get("impression")
