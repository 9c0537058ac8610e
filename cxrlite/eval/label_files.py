"""Label a file of report texts (`cxrlite data label`) with the CheXpert labeler.

A .jsonl / .json file holds one {"id": ..., "text": "..."} record a line; any other file one
report a line, whose id is its line number (blank lines are skipped). The output is JSONL, one
{"id": ..., "labels": {observation: value}} a report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrlite.errors import CxrliteError

JSONL_SUFFIXES = (".jsonl", ".json")


class ReportFileError(CxrliteError, ValueError):
    """A report file that cannot be read: not UTF-8 text, or a record without id and text."""


def read_reports(source: Path) -> list[tuple[Any, str]]:
    """[(id, report text)] of a report file (see the module docstring)."""
    from cxrlite.fileio import read_jsonl

    try:
        if source.suffix.lower() in JSONL_SUFFIXES:
            rows = read_jsonl(source)
        else:
            lines = source.read_text(encoding="utf-8").splitlines()
            return [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    except UnicodeDecodeError:
        raise ReportFileError(
            f"{source}: not UTF-8 text; give one report a line, or JSONL with `id` and `text`"
        ) from None
    for i, row in enumerate(rows, 1):
        if "id" not in row or not isinstance(row.get("text"), str):
            raise ReportFileError(f"{source}: record {i} needs an `id` and a string `text`")
    return [(row["id"], row["text"]) for row in rows]


def label_file(source: Path, out: Path, explain: bool = False) -> list[dict[str, Any]]:
    """Write the labels of every report of `source` to the JSONL `out` and return the records.
    With `explain`, each record also lists the decisions behind its labels (phrase, rule, cue)."""
    from cxrlite.fileio import write_jsonl

    records = [label_record(id_, text, explain) for id_, text in read_reports(source)]
    write_jsonl(out, records)
    return records


def label_record(id_: Any, text: str, explain: bool = False) -> dict[str, Any]:
    from cxrlite.eval.labeler import explain_report, label_report

    record = {"id": id_, "labels": label_report(text)}
    if explain:
        record["decisions"] = [explanation(d) for d in explain_report(text)]
    return record


def explanation(decision: Any) -> dict[str, Any]:
    """One decision as a record: the observation and value, the phrase matched, the rule and the
    cue that decided it, and the clause it was read in (its scope)."""
    value = decision.value if decision.value is not None else "ignored (not about this study)"
    return {
        "observation": decision.observation,
        "value": value,
        "phrase": decision.phrase,
        "rule": decision.rule,
        "cue": decision.cue,
        "scope": decision.clause,
    }
