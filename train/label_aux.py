"""Stage 3's optional report-label term: the 14 CheXpert observations predicted from the LLM's own
hidden states at the image positions, trained beside the answer loss and dropped afterwards.

Why: from scratch, the ViT's patch features already separate the findings (a linear probe on the
flattened patches of the `small` model reaches macro-F1 0.9 on held-out phantoms), yet greedy
findings text under-calls them (pleural effusion recall 0.27): a finding's few answer tokens are a
weak signal next to a report's boilerplate, and an unsure model's mass is split over many phrasings
of the positive while one negative phrasing takes the greedy pick. Asking the LLM's middle layer
to state every finding at the image positions, which all later text tokens attend to, gives the
LLM a dense label signal (the stage-1 objective's report-label term, one level up).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrlite.model import CXRVLM
from cxrlite.train.text_side import N_REPORT_LABELS


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
        embeds = self.model.embed_inputs(input_ids, pixels)
        out = self.model.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            output_hidden_states=True,
        )
        hidden = out.hidden_states[self.layer].float()
        image = (input_ids == self.model.cfg.image_token_id).unsqueeze(-1)
        count = image.sum(1).clamp(min=1)
        mean = (hidden * image).sum(1) / count
        peak = hidden.masked_fill(~image, torch.finfo(hidden.dtype).min).amax(1)
        peak = torch.where(image.any(1), peak, torch.zeros_like(peak))  # text-only rows: masked
        logits = self.label_head(torch.cat([mean, peak], dim=-1))
        per_label = F.binary_cross_entropy_with_logits(logits, report_labels, reduction="none")
        label_loss = (per_label * report_label_mask).sum() / report_label_mask.sum().clamp(min=1)
        return {
            "loss": out.loss + self.weight * label_loss,
            "answers": out.loss.detach(),
            "report_labels": label_loss.detach(),
            "n_tokens": labels.ne(-100).sum(),
        }
