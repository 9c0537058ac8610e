"""Stage 1's text side: a small text encoder (contrastive), caption decoder (captioning) and
report-label head.

CheXagent trains its vision encoder with image-text contrastive + captioning objectives (CoCa
style) and then drops the text side; only the ViT moves on. The text halves are torch.nn
transformer stacks: tiny, trained from scratch, thrown away, so no pretrained text model is worth
loading. The third objective predicts the 14 CheXpert observations that the report labeler reads
from each image's own report (weak labels from the text, as CheXzero-style work uses): report
text is mostly boilerplate, and from scratch on a few thousand images the contrastive and caption
losses alone leave the findings barely separable (linear probe macro-F1 ~0.7 on phantoms).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, CORE_FINDINGS
from cxrlite.model.config import VisionConfig
from cxrlite.model.vision import select_features

N_REPORT_LABELS = len(CHEXPERT_OBSERVATIONS)


class TextSide(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        vision: VisionConfig,
        embed_dim: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        max_len: int = 512,
        pad_id: int = 0,
        local_labels: bool = False,
    ) -> None:
        super().__init__()
        width = vision.hidden_size
        self.pad_id = pad_id
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(max_len, width)
        layer = dict(
            d_model=width,
            nhead=num_heads,
            dim_feedforward=4 * width,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer), num_layers, enable_nested_tensor=False
        )
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer), num_layers)
        self.lm_head = nn.Linear(width, vocab_size)
        self.image_proj = nn.Linear(width, embed_dim)
        self.label_head = nn.Linear(2 * width, N_REPORT_LABELS)
        self.text_proj = nn.Linear(width, embed_dim)
        # SigLIP's learned temperature and bias, initialised as in the paper (t = 10, b = -10).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        # Only when weighed, and last: without it a run draws the same random numbers as before.
        self.local_label_head = None
        if local_labels:
            n_patches = (vision.image_size // vision.patch_size) ** 2
            self.local_label_head = nn.Linear(n_patches * width, N_REPORT_LABELS)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))

    def text_embedding(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self._embed(ids), src_key_padding_mask=mask == 0)
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def image_embedding(self, patches: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(patches.mean(1)), dim=-1)

    def caption_logits(
        self, ids: torch.Tensor, mask: torch.Tensor, patches: torch.Tensor
    ) -> torch.Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(
            ids.shape[1], device=ids.device, dtype=torch.bool
        )
        hidden = self.decoder(
            self._embed(ids), patches, tgt_mask=causal, tgt_key_padding_mask=mask == 0
        )
        return self.lm_head(hidden)


def mean_max_pool(states: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B, N, D] -> [B, 2D]: mean and max over the positions where `keep` [B, N] is true (all when
    None; a row with none pools to zeros). The max keeps a small focal finding (nodule, thin
    pneumothorax) that the mean washes out."""
    if keep is None:
        return torch.cat([states.mean(1), states.amax(1)], dim=-1)
    keep = keep.unsqueeze(-1)
    mean = (states * keep).sum(1) / keep.sum(1).clamp(min=1)
    peak = states.masked_fill(~keep, torch.finfo(states.dtype).min).amax(1)
    peak = torch.where(keep.any(1), peak, torch.zeros_like(peak))
    return torch.cat([mean, peak], dim=-1)


def report_label_logits(head: nn.Linear, patches: torch.Tensor) -> torch.Tensor:
    return head(mean_max_pool(patches))


def local_report_label_logits(head: nn.Linear, patches: torch.Tensor) -> torch.Tensor:
    """The labels from every patch at its place (flattened): an effusion is evidence at the
    costophrenic angle, not anywhere, and a pooled read of a ViT trained from scratch loses where
    the evidence lies (a linear probe on the flattened patches beats one on the pooled features)."""
    return head(patches.flatten(1))


def report_label_loss(
    logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Binary cross-entropy over the observations that `mask` keeps (uncertain ones are out)."""
    per_label = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_label * mask).sum() / mask.sum().clamp(min=1)


def siglip_loss(
    image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid pairwise loss (SigLIP): matching pairs on the diagonal are positives."""
    logits = image @ text.T * scale.exp() + bias
    labels = 2 * torch.eye(len(image), device=image.device) - 1
    return -F.logsigmoid(labels * logits).sum() / len(image)


class VisionPretrainer(nn.Module):
    """What stage 1 trains: the ViT plus the text side, with one forward returning the loss."""

    def __init__(
        self,
        vision: nn.Module,
        vision_cfg: VisionConfig,
        text: TextSide,
        weights: dict[str, float],
    ) -> None:
        super().__init__()
        self.vision = vision
        self.vision_cfg = vision_cfg
        self.text = text
        self.weights = weights  # term -> weight, every term (StageDef.loss_weight)

    def forward(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        report_labels: torch.Tensor,
        report_label_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        dtype = next(self.vision.parameters()).dtype
        outputs = self.vision(pixel_values=pixels.to(dtype), output_hidden_states=True)
        patches = select_features(self.vision, outputs, self.vision_cfg)
        contrastive = siglip_loss(
            self.text.image_embedding(patches),
            self.text.text_embedding(input_ids, attention_mask),
            self.text.logit_scale,
            self.text.logit_bias,
        )
        logits = self.text.caption_logits(input_ids[:, :-1], attention_mask[:, :-1], patches)
        caption = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        label_logits = report_label_logits(self.text.label_head, patches)
        label = report_label_loss(label_logits, report_labels, report_label_mask)
        w = self.weights
        loss = w["contrastive"] * contrastive + w["caption"] * caption + w["report_labels"] * label
        terms = {"contrastive": contrastive, "caption": caption, "report_labels": label}
        if self.text.local_label_head is not None:
            local_logits = local_report_label_logits(self.text.local_label_head, patches)
            terms["report_labels_local"] = report_label_loss(
                local_logits, report_labels, report_label_mask
            )
            loss = loss + w["report_labels_local"] * terms["report_labels_local"]
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


@torch.no_grad()
def report_label_f1(module: VisionPretrainer, dataset, pad_id: int, device: torch.device) -> float:
    """Stage 1's visual learning signal: macro-F1 over the core findings of the report-label head
    on held-out images (what the vision encoder can already tell apart)."""
    from cxrlite.eval.metrics import f1_from_matrices
    from cxrlite.train.data import collate

    training = module.training
    module.eval()
    preds, targets = [], []
    for start in range(0, len(dataset), 16):
        b = collate([dataset[i] for i in range(start, min(start + 16, len(dataset)))], pad_id)
        outputs = module.vision(pixel_values=b["pixels"].to(device), output_hidden_states=True)
        patches = select_features(module.vision, outputs, module.vision_cfg)
        preds.append(report_label_logits(module.text.label_head, patches).cpu() > 0)
        targets.append(b["report_labels"] > 0.5)
    module.train(training)
    columns = [CHEXPERT_OBSERVATIONS.index(obs) for obs in CORE_FINDINGS]
    pred, target = torch.cat(preds)[:, columns], torch.cat(targets)[:, columns]
    return f1_from_matrices(pred.numpy(), target.numpy())["macro_f1"]
