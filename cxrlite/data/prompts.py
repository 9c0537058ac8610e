"""Every prompt the model is trained on or asked, defined once.

Training (stage 3's instruction tasks), evaluation, the quality gate, the runtime's report and
the benchmarks all ask with these strings: a model answers best in the wording it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

FINDINGS_PROMPTS = (
    "Describe the findings in this chest X-ray.",
    "Write the findings section of the radiology report for this chest X-ray.",
    "What are the findings in this chest radiograph?",
    "Generate the findings for this chest X-ray.",
)
# The one findings prompt of evaluation, reports and benchmarks.
FINDINGS_PROMPT = FINDINGS_PROMPTS[0]
# Room for the findings answer of evaluation and quality checks: the checklist of the core
# findings (cxrlite.data.tasks.findings_checklist) and then the longest phantom report's prose.
FINDINGS_MAX_TOKENS = 128
IMPRESSION_PROMPTS = (
    "Write the impression for this chest X-ray.",
    "What is the impression of this chest radiograph?",
    "Summarize this chest X-ray in an impression.",
)
SUMMARY_PROMPTS = (
    "Summarize these chest X-ray findings into an impression.",
    "Write the impression for a chest X-ray report with these findings.",
)
VIEW_QUESTIONS = (
    "What is the view of this chest X-ray?",
    "Is this chest X-ray a PA or an AP view?",
)


def summary_prompt(findings: str, instruction: str = SUMMARY_PROMPTS[0]) -> str:
    """The findings-summarization prompt: an impression written from findings text (no image)."""
    return f"{instruction}\nFindings: {findings}"


def choice_prompt(question: str, options: Sequence[str]) -> str:
    """A multiple-choice question with its options listed, as the model sees it."""
    return f"{question}\nOptions: {'; '.join(options)}"
