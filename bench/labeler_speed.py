"""How many reports a second the report labeler reads on one core (it runs on the request path:
every `cxrlite report`, `/v1/reports` and quality-gate study goes through it).

    cxrlite bench labeler                               # phantom reports
    cxrlite bench labeler --reports reports.txt --out labeler.json

Two figures: "unseen" clears the labeler's sentence cache before every report, so no sentence
was read before (the worst case: every sentence new); "repeated" reads the same reports again
with the cache kept, as a service labelling its own generated reports does. The labeler is
single-threaded Python: one process uses one core.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger(__name__)


def phantom_reports(n: int, seed: int = 0) -> list[str]:
    """`n` radiology-style reports written from sampled phantom labels."""
    import numpy as np

    from cxrlite.phantoms.generator import sample_labels
    from cxrlite.phantoms.reports import write_report

    label_rng, text_rng = np.random.default_rng(seed), random.Random(seed)
    reports = []
    for _ in range(n):
        findings, impression = write_report(sample_labels(label_rng), text_rng)
        reports.append(f"FINDINGS: {findings}\nIMPRESSION: {impression}")
    return reports


def measure(reports: list[str], repeats: int = 3) -> dict[str, Any]:
    from cxrlite.eval.labeler import forget_sentences, label_report

    def rate(clear_each: bool) -> float:
        best = 0.0
        for _ in range(repeats):
            forget_sentences()
            start = time.perf_counter()
            for text in reports:
                if clear_each:
                    forget_sentences()
                label_report(text)
            best = max(best, len(reports) / (time.perf_counter() - start))
        return best

    unseen = rate(clear_each=True)
    for text in reports:  # fill the cache, then time the repeat
        label_report(text)
    start = time.perf_counter()
    for text in reports:
        label_report(text)
    repeated = len(reports) / (time.perf_counter() - start)
    return {
        "reports": len(reports),
        "mean_chars": round(sum(map(len, reports)) / max(1, len(reports))),
        "unseen_reports_per_s": round(unseen),
        "repeated_reports_per_s": round(repeated),
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


@click.command("labeler")
@click.option("--reports", "source", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Report texts (one a line, or JSONL with id/text); default: "
              "phantom reports.")  # fmt: skip
@click.option("-n", "n", type=click.IntRange(1), default=2000, show_default=True,
              help="Phantom reports to write when --reports is not given.")  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the figures as JSON here.")  # fmt: skip
def labeler_command(source: Path | None, n: int, out: Path | None) -> None:
    """Report labeler speed on one core: reports a second, unseen and repeated."""
    if source is not None:
        from cxrlite.eval.label_files import read_reports

        reports = [text for _, text in read_reports(source)]
    else:
        reports = phantom_reports(n)
    result = {"source": str(source) if source else f"{n} phantom reports", **measure(reports)}
    click.echo(
        f"{result['reports']} reports ({result['mean_chars']} characters each on average): "
        f"{result['unseen_reports_per_s']} reports/s unseen, "
        f"{result['repeated_reports_per_s']} reports/s repeated, one core"
    )
    if out is not None:
        from cxrlite.fileio import write_json

        write_json(out, result)
