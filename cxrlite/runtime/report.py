"""The report product: a study's findings, then its impression, then CheXpert labels of both.

A cxrlite-trained model writes the impression from its generated findings (text only: stage 3's
findings-summarization task) rather than from the image independently, so it cannot contradict
the findings it summarizes. An imported model is asked with its own prompts
(`ModelConfig.report_prompts`); where it has no impression task the impression is None and the
report says so, rather than asking it something it was never trained for. The report labeler
turns the text into the 14 coded observations that `cxrlite report` and `/v1/reports` carry.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from cxrlite.data.prompts import summary_prompt
from cxrlite.eval.labeler import label_report
from cxrlite.runtime.generation import ms

# The timings of each generated part, as a report shows them.
PART_TIMINGS = ("queue_ms", "prefill_ms", "decode_ms", "tokens_per_s", "total_ms")


def draft_report(
    runtime: Any,
    image: Any,
    *,
    max_tokens: int = 128,
    cancelled: threading.Event | None = None,
) -> dict[str, Any]:
    """Findings, impression, labels, the variants that wrote them and per-phase timings, from
    a `cxrlite.runtime.Runtime` (which calls this as `Runtime.report`) for any image it takes.
    Setting `cancelled` (any thread) stops it before its next token; the impression is then not
    started and its `finish_reason` is "cancelled"."""
    t0 = time.perf_counter()
    own = runtime.config.report_prompts
    encoded = runtime.image_embeddings(image)
    findings = runtime.findings(encoded, max_tokens=max_tokens, cancelled=cancelled)
    parts = {"findings": findings, "impression": None}
    if own is None:
        parts["impression"] = runtime.complete(
            summary_prompt(findings.text.strip()), None, max_tokens=max_tokens, cancelled=cancelled
        )
    elif own["impression"] is not None:
        parts["impression"] = runtime.complete(
            own["impression"], encoded, max_tokens=max_tokens, cancelled=cancelled
        )
    texts = {k: c.text.strip() if c is not None else None for k, c in parts.items()}
    labelled = "\n".join(f"{k.upper()}: {t}" for k, t in texts.items() if t is not None)
    report = {
        **texts,
        "labels": label_report(labelled),
        "variants": runtime.variants,
        "cache_hit": findings.cache_hit,
        "finish_reason": {k: c.finish_reason if c else None for k, c in parts.items()},
        "timings": {
            "preprocess_ms": encoded.preprocess_ms,
            "vision_ms": encoded.vision_ms,
            **{k: _part_timings(c) for k, c in parts.items()},
            "total_ms": ms(time.perf_counter() - t0),
        },
        "usage": {
            key: sum(c.usage[key] for c in parts.values() if c is not None)
            for key in ("prompt_tokens", "completion_tokens")
        },
    }
    if parts["impression"] is None:
        report["notes"] = ["this model writes findings only: no impression"]
    return report


def _part_timings(completion: Any) -> dict[str, float]:
    return {k: completion.timings.get(k, 0.0) if completion else 0.0 for k in PART_TIMINGS}
