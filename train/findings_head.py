"""Fit the findings head (cxrlite.model.findings) on a trained model's frozen image embeddings.

After the recipe's last stage: the image embeddings of the training studies, standardized, fit a
logistic regression per checklist finding (full-batch Adam, L2); the standardization is folded
into the weights, so the head is one linear layer on raw embeddings. Each finding's threshold is
the one with the best F1 on the validation studies. Deterministic: same model and data, same head.

Why not a loss term of stage 3: the embeddings move while stage 3 fine-tunes the ViT and bridger,
and a head trained on moving features for a few hundred steps lags them; on the frozen final
embeddings the fit converges in seconds. Written by hand (no scikit-learn): a 5-output logistic
regression is twenty lines of torch, and scikit-learn would be a dependency for this alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cxrlite.data.labels import POSITIVE
from cxrlite.data.records import Study
from cxrlite.eval.metrics import f1_from_matrices
from cxrlite.model.config import FindingsHeadConfig, ModelConfig
from cxrlite.model.vlm import CXRVLM, FindingsHead

logger = logging.getLogger(__name__)

FIT_STEPS = 300
FIT_LR = 3e-3
# L2 on the standardized inputs; the value the measurements in docs/training-experiments.md used
FIT_WEIGHT_DECAY = 1e-2


@torch.no_grad()
def image_features(
    model: CXRVLM, studies: Sequence[Study], pixels_for: Callable[[str], torch.Tensor]
) -> torch.Tensor:
    """[N, n_image_tokens * hidden] float32: each study's image embeddings, flattened."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(studies), 64):
        pixels = torch.stack([pixels_for(s.image) for s in studies[start : start + 64]])
        out.append(model.encode_image(pixels.to(device)).flatten(1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.image_embedding_size)


def targets(studies: Sequence[Study], observations: Sequence[str]) -> torch.Tensor:
    """[N, n_obs]: 1 where the truth is positive (uncertain counts as negative, as
    cxrlite.eval.metrics.findings_f1 scores it)."""
    return torch.tensor(
        [[s.chexpert.get(o) == POSITIVE for o in observations] for s in studies]
    ).float()


def fit_linear(x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [n_obs, n], bias [n_obs]) of a logistic regression on raw inputs `x`."""
    mean, std = x.mean(0), x.std(0) + 1e-5
    z = (x - mean) / std
    torch.manual_seed(seed)
    linear = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(linear.parameters(), lr=FIT_LR, weight_decay=FIT_WEIGHT_DECAY)
    for _ in range(FIT_STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(z), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        weight = linear.weight / std  # w . (x - mean) / std + b == (w / std) . x + b'
        bias = linear.bias - weight @ mean
    return weight, bias


def best_thresholds(logits: np.ndarray, y: np.ndarray) -> list[float]:
    """Per column, the threshold with the best F1 (midway between the two logits it separates);
    0 where the column has no positive."""
    out = []
    for j in range(logits.shape[1]):
        scores, truth = logits[:, j], y[:, j] > 0.5
        if not truth.any():
            out.append(0.0)
            continue
        values = np.unique(scores)[::-1]  # high to low: predict positive at >= value
        f1s = [f1_from_matrices((scores >= v)[:, None], truth[:, None])["macro_f1"] for v in values]
        k = int(np.argmax(f1s))
        below = values[k + 1] if k + 1 < len(values) else values[k] - 1.0
        out.append(float((values[k] + below) / 2))
    return out


def fit_findings_head(
    model: CXRVLM,
    cfg: ModelConfig,
    splits: dict[str, list[Study]],
    pixels_for: Callable[[str], torch.Tensor],
    seed: int,
) -> tuple[ModelConfig, dict[str, Any] | None]:
    """Fit the head on the training studies, choose thresholds on the validation studies, put it
    on `model`; returns the config that carries it and what was measured (None, and `cfg` as it
    was, where the studies carry no labels: the LLM then writes the checklist itself)."""
    observations = FindingsHeadConfig().observations
    train = [s for s in splits["train"] if s.chexpert]
    val = [s for s in splits["validate"] if s.chexpert]
    if not train or not val:  # e.g. a dataset of reports without CheXpert labels
        logger.warning("no findings head: it needs labelled training and validation studies")
        return cfg, None
    x = image_features(model, train, pixels_for)
    weight, bias = fit_linear(x, targets(train, observations), seed)
    del x
    val_logits = (image_features(model, val, pixels_for) @ weight.T + bias).numpy()
    val_truth = targets(val, observations).numpy() > 0.5
    thresholds = best_thresholds(val_logits, val_truth)
    cfg = cfg.replace(findings_head=FindingsHeadConfig(observations, tuple(thresholds)))
    device = next(model.parameters()).device
    head = FindingsHead(cfg)
    head.linear.weight.data.copy_(weight)
    head.linear.bias.data.copy_(bias)
    model.findings_head, model.cfg = head.to(device), cfg
    f1 = f1_from_matrices(val_logits >= np.asarray(thresholds), val_truth)["macro_f1"]
    logger.info("findings head: validation macro-F1 %.3f at thresholds %s", f1, thresholds)
    return cfg, {"n_train": len(train), "n_validate": len(val), "val_macro_f1": f1}
