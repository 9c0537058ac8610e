"""Stage 3's optional report-label term: the 14 CheXpert observations predicted from the LLM's own
hidden states at the image positions, trained beside the answer loss and dropped afterwards.

Why: from scratch, the ViT's patch features already separate the findings (a linear probe on the
flattened patches of the `small` model does well on held-out phantoms), yet greedy findings
text under-calls them, pleural effusion most (docs/training-experiments.md): a finding's few
answer tokens are a weak signal next to a report's boilerplate, and an unsure model's mass is
split over many phrasings of the positive while one negative phrasing takes the greedy pick.
Asking the LLM's middle layer to state every finding at the image positions, which all later
text tokens attend to, gives the LLM a dense label signal (the stage-1 objective's report-label
term, one level up).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cxrlite.model.vlm import CXRVLM
from cxrlite.train.text_side import N_REPORT_LABELS, mean_max_pool, report_label_loss


def label_layer(num_layers: int) -> int:
    """The hidden state the head reads: the middle layer's output, whose keys and values the upper
    half of the LLM attends to when it writes the answer."""
    return max(1, num_layers // 2)


class InstructionWithLabels(nn.Module):
    """The VLM plus a linear report-label head on its mean + max pooled image-position states."""

    def __init__(self, model: CXRVLM, weight: float) -> None:
        super().__init__()
        self.model = model
        self.weight = weight
        self.layer = label_layer(model.cfg.llm.num_layers)
        self.label_head = nn.Linear(2 * model.cfg.llm.hidden_size, N_REPORT_LABELS)

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
        image = input_ids == self.model.cfg.image_token_id  # text-only rows pool to zeros
        pooled = mean_max_pool(out.hidden_states[self.layer].float(), image)
        logits = self.label_head(pooled)
        label_loss = report_label_loss(logits, report_labels, report_label_mask)
        return {
            "loss": out.loss + self.weight * label_loss,
            "answers": out.loss.detach(),
            "report_labels": label_loss.detach(),
            "n_tokens": labels.ne(-100).sum(),
        }
