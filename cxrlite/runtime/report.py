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

from cxrlite.data.prompts import FINDINGS_PROMPT, summary_prompt
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
    encoded = runtime.image_embeddings(image)
    findings = runtime.complete(
        FINDINGS_PROMPT, encoded, max_tokens=max_tokens, cancelled=cancelled
    )
    impression = runtime.complete(
        summary_prompt(findings.text.strip()), None, max_tokens=max_tokens, cancelled=cancelled
    )
    text = f"FINDINGS: {findings.text.strip()}\nIMPRESSION: {impression.text.strip()}"
    return {
        "findings": findings.text.strip(),
        "impression": impression.text.strip(),
        "labels": label_report(text),
        "variants": runtime.variants,
        "cache_hit": findings.cache_hit,
        "finish_reason": {
            "findings": findings.finish_reason,
            "impression": impression.finish_reason,
        },
        "timings": {
            "preprocess_ms": encoded.preprocess_ms,
            "vision_ms": encoded.vision_ms,
            "findings": {k: findings.timings.get(k, 0.0) for k in PART_TIMINGS},
            "impression": {k: impression.timings.get(k, 0.0) for k in PART_TIMINGS},
            "total_ms": ms(time.perf_counter() - t0),
        },
        "usage": {
            key: findings.usage[key] + impression.usage[key]
            for key in ("prompt_tokens", "completion_tokens")
        },
    }
