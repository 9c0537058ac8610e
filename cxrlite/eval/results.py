"""`cxrlite eval`'s results (cxrlite.eval.chexbench.run_eval's payload) as tables and files.

Tables are {title: (header, rows)} of strings, which the command prints and `to_markdown` writes
to eval.md beside eval.json. Figures are percentages with their 95% bootstrap intervals
("value [low, high]"); "-" marks a figure that could not be measured."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from cxrlite.eval.chexbench import MC_TASKS

Table = tuple[list[str], list[list[str]]]


def _ci(stat: dict[str, float] | None, scale: float = 100.0) -> str:
    if stat is None or not math.isfinite(stat.get("value", math.nan)):
        return "-"
    low, high = stat["low"] * scale, stat["high"] * scale
    return f"{stat['value'] * scale:.1f} [{low:.1f}, {high:.1f}]"


def eval_tables(results: dict[str, dict[str, Any]]) -> dict[str, Table]:
    """{title: (header, rows)} of the comparison, per-task accuracy and fairness."""
    main_rows = []
    for name, r in results.items():
        f5, f14 = r["findings"]["core5"], r["findings"]["chexpert14"]
        main_rows.append([
            name, _ci(r["mc"]["all"]), _ci(f5["macro_f1"]), _ci(f5["micro_f1"]),
            _ci(f14["macro_f1"]), _ci(f14["micro_f1"]), _ci(r["text"]["rouge_l"]),
            _ci(r["text"]["bleu"], 1.0), f"{r['perplexity']:.2f}",
            f"{100 * r.get('same_text_as_reference', math.nan):.0f}", f"{r['wall_s']:.1f}",
        ])  # fmt: skip
    header = ["variant", "MC acc %", "F1-5 macro", "F1-5 micro", "F1-14 macro", "F1-14 micro",
              "ROUGE-L", "BLEU", "ppl", "same text %", "s"]  # fmt: skip
    tables = {"Comparison (95% bootstrap CI)": (header, main_rows)}
    tasks = [t for t in MC_TASKS if any(t in r["mc"] for r in results.values())]
    tables["Multiple choice accuracy % by task"] = (
        ["task", *results],
        [[t, *(_ci(r["mc"].get(t)) + f" n={r['mc'].get(t, {}).get('n', 0)}" for r in results.values())]
         for t in tasks],
    )  # fmt: skip
    fair_rows = []
    for name, r in results.items():
        for by, breakdown in r["fairness"].items():
            for group, g in breakdown["groups"].items():
                fair_rows.append(
                    [name, f"{by}={group}", str(g["n"]), _ci(g["macro_f1"]), _ci(g["micro_f1"])]
                )
            fair_rows.append([name, f"{by} gap", "", f"{100 * breakdown['macro_f1_gap']:.1f}", ""])
    tables["Fairness: findings F1 (5 core findings) by group"] = (
        ["variant", "group", "n", "macro F1", "micro F1"],
        fair_rows,
    )
    return tables


def to_markdown(payload: dict[str, Any]) -> str:
    """eval.md: the settings, then every table of `eval_tables`, then the skipped variants."""
    lines = [f"# cxrlite eval: {payload['target']}", "",
             f"- data: {payload['data']} ({payload['n_studies']} test studies, "
             f"{payload['n_mc']} multiple-choice records), bootstrap {payload['bootstrap']} "
             f"resamples, seed {payload['seed']}"]  # fmt: skip
    for title, (header, rows) in eval_tables(payload["results"]).items():
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines += ["|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if payload.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in payload["skipped"].items()]
    return "\n".join(lines) + "\n"


def write_eval(payload: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """out/eval.json (the payload, numbers as JSON floats) and out/eval.md (its tables)."""
    from cxrlite.fileio import atomic_write_text, write_json

    json_path, md_path = out / "eval.json", out / "eval.md"
    write_json(json_path, json.loads(json.dumps(payload, default=float)))
    atomic_write_text(md_path, to_markdown(payload))
    return json_path, md_path
