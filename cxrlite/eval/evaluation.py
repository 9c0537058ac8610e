"""Quality of a trained model on held-out studies.

Free text is scored the way the papers score it: generate findings, label them with the report
labeler, and compare with the truth (CheXbert-style F1). Multiple-choice tasks are scored by the
log-likelihood of each option (CheXbench style), so no answer parsing is involved.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cxrlite.data.labels import CORE_FINDINGS
from cxrlite.data.prompts import FINDINGS_MAX_TOKENS, FINDINGS_PROMPT, checklist_text
from cxrlite.data.records import Study, TaskRecord
from cxrlite.eval.labeler import label_report
from cxrlite.eval.metrics import findings_f1
from cxrlite.model.findings import decisions, findings_text
from cxrlite.model.tokenizer import answer_prefix_ids, encode_example

logger = logging.getLogger(__name__)


PixelsFor = Callable[[str], torch.Tensor]  # image path -> preprocessed [C, S, S]


@torch.no_grad()
def generate_findings(
    model: Any,
    tokenizer: Any,
    studies: Sequence[Study],
    pixels_for: PixelsFor,
    *,
    batch_size: int = 16,
    max_new_tokens: int = FINDINGS_MAX_TOKENS,
    prompt: str = FINDINGS_PROMPT,
) -> list[str]:
    """Greedy findings text for each study. A model with a findings head states the checklist
    from it and generates the prose after it (cxrlite.model.findings), as the runtime does."""
    model.eval()
    device = next(model.parameters()).device
    prompt_ids = encode_example(
        tokenizer, prompt, None, with_image=True, n_image_tokens=model.cfg.n_image_tokens
    )["input_ids"]
    texts: list[str] = []
    for start in range(0, len(studies), batch_size):
        chunk = studies[start : start + batch_size]
        embeds = model.encode_image(torch.stack([pixels_for(s.image) for s in chunk]).to(device))
        stated: list[dict[str, str] | None] = [None] * len(chunk)
        if model.findings_head is not None:
            logits = model.findings_head(embeds).tolist()
            stated = [decisions(row, model.cfg.findings_head) for row in logits]
        prefixes = [checklist_text(d) if d else "" for d in stated]
        rows = [prompt_ids + answer_prefix_ids(tokenizer, p) for p in prefixes]
        ids, mask = _left_padded(rows, tokenizer.pad_token_id, device)
        out = model.generate(ids, mask, image_embeds=embeds, max_new_tokens=max_new_tokens)
        for d, row in zip(stated, out, strict=True):
            prose = tokenizer.decode(row, skip_special_tokens=True).strip()
            texts.append(findings_text(d, prose) if d else prose)
    return texts


def _left_padded(
    rows: Sequence[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def score_findings(
    generated: Sequence[str], studies: Sequence[Study], observations: Sequence[str] = CORE_FINDINGS
) -> dict[str, Any]:
    """Labeler F1 of generated findings against each study's CheXpert truth."""
    pred = [label_report(text) for text in generated]
    truth = [study.chexpert for study in studies]
    return findings_f1(pred, truth, observations=tuple(observations))


@torch.no_grad()
def option_logprobs(
    model: Any, tokenizer: Any, record: TaskRecord, pixels_for: PixelsFor
) -> list[float]:
    """Sum of answer-token log-probabilities for each option of a multiple-choice record."""
    device = next(model.parameters()).device
    encs = [
        encode_example(
            tokenizer,
            record.prompt,
            option,
            with_image=bool(record.images),
            n_image_tokens=model.cfg.n_image_tokens,
        )
        for option in record.options or []
    ]
    width = max(len(e["input_ids"]) for e in encs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor(
        [e["input_ids"] + [pad] * (width - len(e["input_ids"])) for e in encs], device=device
    )
    labels = torch.tensor(
        [e["labels"] + [-100] * (width - len(e["labels"])) for e in encs], device=device
    )
    mask = (
        torch.arange(width, device=device)[None]
        < torch.tensor([len(e["input_ids"]) for e in encs], device=device)[:, None]
    ).long()
    pixels = None
    if record.images:
        pixels = pixels_for(record.images[0]).unsqueeze(0).expand(len(encs), -1, -1, -1).to(device)
    logits = model(input_ids=ids, attention_mask=mask, pixels=pixels).logits[:, :-1].float()
    target = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * (target != -100)).sum(-1).tolist()


def multiple_choice_accuracy(
    model: Any, tokenizer: Any, records: Sequence[TaskRecord], pixels_for: PixelsFor
) -> dict[str, dict[str, float]]:
    """Accuracy per task over the multiple-choice records (the option with the highest likelihood)."""
    model.eval()
    hits: dict[str, list[int]] = defaultdict(list)
    for rec in records:
        if not rec.options:
            continue
        scores = option_logprobs(model, tokenizer, rec, pixels_for)
        hits[rec.task].append(
            int(rec.options[max(range(len(scores)), key=scores.__getitem__)] == rec.answer)
        )
    return {task: {"accuracy": sum(h) / len(h), "n": len(h)} for task, h in sorted(hits.items())}
