"""Every prompt the model is trained on or asked, defined once.

Training (stage 3's instruction tasks), evaluation, the quality gate, the runtime's report and
the benchmarks all ask with these strings: a model answers best in the wording it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cxrlite.data.labels import NEGATIVE, POSITIVE, UNCERTAIN

FINDINGS_PROMPTS = (
    "Describe the findings in this chest X-ray.",
    "Write the findings section of the radiology report for this chest X-ray.",
    "What are the findings in this chest radiograph?",
    "Generate the findings for this chest X-ray.",
)
# The one findings prompt of evaluation, reports and benchmarks.
FINDINGS_PROMPT = FINDINGS_PROMPTS[0]
# Room for the findings answer of evaluation and quality checks: the checklist of the core
# findings (`checklist_text`) and then the longest phantom report's prose.
FINDINGS_MAX_TOKENS = 128
# How the findings answer states each core finding before its prose, in this fixed order.
CHECKLIST_TERMS: dict[str, str] = {
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural effusion",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Edema": "edema",
}
_CHECKLIST_STATEMENT = {POSITIVE: "{}.", UNCERTAIN: "Possible {}.", NEGATIVE: "No {}."}
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


def checklist_text(labels: Mapping[str, str]) -> str:
    """The findings answer's opening checklist: one short sentence per core finding, in
    CHECKLIST_TERMS order ("No cardiomegaly. Pleural effusion. ..."), from CheXpert values
    (observation -> positive / negative / uncertain); an observation `labels` lacks is left out.

    Why: free prose spreads a positive finding's probability over many phrasings and positions,
    so greedy decoding of an unsure model picks the one common negative phrasing. The checklist
    puts each decision at a fixed position between fixed alternatives ("No X." or "X."), and the
    prose after it is written conditioned on what the checklist stated. Training writes it from
    a study's labels (cxrlite.data.tasks.findings_answer); a model with a findings head
    (cxrlite.model.findings) states it from the head's decisions and writes only the prose. The
    report labeler reads the sentences as plain statements.
    """
    sentences = []
    for obs, term in CHECKLIST_TERMS.items():
        form = _CHECKLIST_STATEMENT.get(labels.get(obs, ""))
        if form is not None:
            sentence = form.format(term)
            sentences.append(sentence[0].upper() + sentence[1:])
    return " ".join(sentences)
