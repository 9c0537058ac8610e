"""Stage 3's optional report-label terms: the 14 CheXpert observations predicted from the LLM's own
hidden states, trained beside the answer loss and dropped afterwards.

Why: from scratch, the ViT's patch features already separate the findings (a linear probe on the
flattened patches of the `small` model does well on held-out phantoms), yet greedy findings
text under-calls them, pleural effusion most (docs/training-experiments.md): a finding's few
answer tokens are a weak signal next to a report's boilerplate, and an unsure model's mass is
split over many phrasings of the positive while one negative phrasing takes the greedy pick.
Asking the LLM's middle layer to state every finding gives the LLM a dense label signal (the
stage-1 objective's report-label term, one level up). Two places, each a loss term of the recipe:

- `report_labels`: the mean + max pooled image positions, which all later text tokens attend to.
- `answer_start_labels`: the last prompt position, the one the answer's first token (the findings
  checklist's first decision) is predicted from: attention there must gather the image's evidence
  into one state, where the upper layers and every later answer token can read it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cxrlite.model.vlm import CXRVLM
from cxrlite.train.text_side import N_REPORT_LABELS, mean_max_pool, report_label_loss

IGNORE = -100
# The stage-3 loss terms this module adds (their weights are the recipe's, train/recipe.py).
LABEL_TERMS = ("report_labels", "answer_start_labels")


def label_layer(num_layers: int) -> int:
    """The hidden state the heads read: the middle layer's output, whose keys and values the upper
    half of the LLM attends to when it writes the answer."""
    return max(1, num_layers // 2)


def answer_start_states(states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, D]: the state at the position before each row's first answer token (a row
    without answer tokens gives its last position; such rows carry no image labels)."""
    is_answer = labels.ne(IGNORE)
    first = torch.where(is_answer.any(1), is_answer.float().argmax(1), labels.shape[1])
    return states[torch.arange(len(states), device=states.device), first - 1]


class InstructionWithLabels(nn.Module):
    """The VLM plus a linear report-label head for each weighted term in LABEL_TERMS."""

    def __init__(self, model: CXRVLM, weights: dict[str, float]) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(LABEL_TERMS))
        if unknown:
            raise ValueError(f"no report-label term(s) {unknown}; terms: {list(LABEL_TERMS)}")
        self.model = model
        self.weights = {term: w for term, w in weights.items() if w > 0}
        self.layer = label_layer(model.cfg.llm.num_layers)
        hidden = model.cfg.llm.hidden_size
        width = {"report_labels": 2 * hidden, "answer_start_labels": hidden}
        self.heads = nn.ModuleDict(
            {term: nn.Linear(width[term], N_REPORT_LABELS) for term in self.weights}
        )

    def _features(self, term: str, states: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        if term == "report_labels":
            image = batch["input_ids"] == self.model.cfg.image_token_id  # text-only rows: zeros
            return mean_max_pool(states, image)
        return answer_start_states(states, batch["labels"])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        report_labels: torch.Tensor,
        report_label_mask: torch.Tensor,
        pixels: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        out = self.model(
            input_ids, attention_mask, pixels, labels=labels, output_hidden_states=True
        )
        states = out.hidden_states[self.layer].float()
        batch = {"input_ids": input_ids, "labels": labels}
        result: dict[str, Any] = {"answers": out.loss.detach(), "n_tokens": labels.ne(IGNORE).sum()}
        loss = out.loss
        for term, head in self.heads.items():
            logits = head(self._features(term, states, batch))
            term_loss = report_label_loss(logits, report_labels, report_label_mask)
            loss = loss + self.weights[term] * term_loss
            result[term] = term_loss.detach()
        result["loss"] = loss
        return result
