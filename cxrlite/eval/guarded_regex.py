"""Regular expressions that skip texts they cannot match: a cheap guard before the real scan.

Why: the report labeler scans every clause of every report with some forty patterns, and most
clauses name one or two observations; a pattern whose alternatives all begin with literal words
("\\bcardiomegaly|\\bcardiac enlargement") cannot match a text holding none of those words,
and one C-level search for the words is cheaper than trying the pattern's alternatives at
every position. Texts must be lower-cased (the labeler lower-cases reports first).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

_META = set(".^$*+?{}[]()|\\")


class GuardedRegex:
    """A compiled pattern with a cheap guard: the literal words its alternatives begin with.
    Report text is lower-cased first, so when none of them is in a clause the pattern cannot
    match there and its scan is skipped (most clauses name one or two observations of the
    fifteen tables; the scans are most of the labeler's time)."""

    def __init__(self, pattern: str) -> None:
        self.regex = re.compile(pattern, re.IGNORECASE)
        self.pattern = pattern
        words = leading_literals(pattern)
        # One C-level scan for the words: cheaper than the pattern's alternatives, and than a
        # Python loop over `word in text`.
        self.guard = re.compile("|".join(map(re.escape, words))) if words else None

    def _absent(self, text: str) -> bool:
        return self.guard is not None and self.guard.search(text) is None

    def finditer(self, text: str, pos: int = 0) -> Iterator[re.Match[str]]:
        return iter(()) if self._absent(text) else self.regex.finditer(text, pos)

    def search(self, text: str, pos: int = 0) -> re.Match[str] | None:
        return None if self._absent(text) else self.regex.search(text, pos)

    def match(self, text: str, pos: int = 0) -> re.Match[str] | None:
        return self.regex.match(text, pos)

    def sub(self, replacement: str, text: str) -> str:
        return text if self._absent(text) else self.regex.sub(replacement, text)


def alternatives_of(pattern: str) -> list[str]:
    """The top-level alternatives of a pattern (split at "|" outside groups and classes)."""
    parts, depth, current, i, in_class = [], 0, "", 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            current += pattern[i : i + 2]
            i += 2
            continue
        if in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch in "()":
            depth += 1 if ch == "(" else -1
        elif ch == "|" and depth == 0:
            parts.append(current)
            current = ""
            i += 1
            continue
        current += ch
        i += 1
    return [*parts, current]


def leading_literals(pattern: str) -> tuple[str, ...] | None:
    """The literal text each alternative must begin with (after a leading \\b), or None when
    one alternative may begin with anything else (no guard is then safe)."""
    words: list[str] = []
    for alternative in alternatives_of(pattern):
        found = leading_words(alternative.removeprefix("\\b"))
        if found is None:
            return None
        words.extend(found)
    return tuple(words)


def leading_words(body: str) -> list[str] | None:
    """The literal words `body` must begin with: its leading letters, or the choices of a
    leading group of plain words ("(vascular|venous) congestion"), or, after an optional group
    ("(hydro)?pneumothorax"), what follows it."""
    if body.startswith("("):
        close = body.find(")")
        inner, rest = body[1:close], body[close + 1 :]
        if close < 0 or any(ch in _META for ch in inner.replace("|", "")):
            return None
        if rest.startswith("?"):
            return leading_words(rest[1:])
        if rest[:1] in ("*", "+", "{"):
            return None
        choices = inner.split("|")
        return [c.lower() for c in choices] if all(len(c) >= 2 for c in choices) else None
    word = ""
    for ch in body:
        if ch in _META:
            if ch in "?*{" and word:  # the quantifier makes the last letter optional
                word = word[:-1]
            break
        word += ch
    return [word.lower()] if len(word) >= 2 else None


def rx(pattern: str) -> GuardedRegex:
    return GuardedRegex(pattern)
