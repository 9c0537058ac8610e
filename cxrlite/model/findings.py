"""The findings head: the checklist of the core findings read from an image's embeddings.

A model trained here answers a findings question with a checklist ("No cardiomegaly. Pleural
effusion. ...") and then prose (cxrlite.data.prompts.checklist_text). With a findings head, the
checklist is stated by one linear read of the image embeddings (the bridger's output, every
position in place, flattened) and the LLM writes the prose after it, conditioned on what the
checklist states: diagnosis-guided generation, as PromptMRG (Jin et al., AAAI 2024) guides its
decoder with a classification branch's diagnoses.

Why: from scratch on a few thousand images, the image embeddings separate the five findings far
better under a linear read at every position than the LLM's greedy text does (its decision for a
local finding, a few pixels at the costophrenic angle, is an unsure one between two fixed
sentences; docs/training-experiments.md). The head is the linear read; its thresholds are chosen
on held-out studies, so each finding is stated at its best F1 rather than at greedy's prior.

The runtime applies it with NumPy (`FindingsReader`) on the embeddings any vision backend
produced, so the ONNX and TensorRT graphs stay as they are; the PyTorch module that holds it in a
checkpoint is cxrlite.model.vlm.FindingsHead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from cxrlite.data.labels import NEGATIVE, POSITIVE, UNCERTAIN
from cxrlite.data.prompts import checklist_text
from cxrlite.eval.labeler import label_report
from cxrlite.model.config import FindingsHeadConfig

# The bundle file of a findings head's weights (safetensors: WEIGHT [n_obs, n], BIAS [n_obs]).
FINDINGS_HEAD_FILE = "findings_head.safetensors"
WEIGHT, BIAS = "weight", "bias"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def decisions(logits: Sequence[float], cfg: FindingsHeadConfig) -> dict[str, str]:
    """observation -> positive / negative: each logit against its threshold."""
    return {
        obs: POSITIVE if float(x) >= t else NEGATIVE
        for obs, x, t in zip(cfg.observations, logits, cfg.thresholds, strict=True)
    }


def findings_text(stated: Mapping[str, str], prose: str) -> str:
    """The findings a model with a head reports: the checklist it `stated` (observation ->
    positive / negative), then the LLM's prose without the sentences that contradict it.

    Why: the prose is written after the checklist, but the LLM also reads the image, and where
    it reads it less well than the head it can write "There is consolidative opacity" after "No
    consolidation." A report must not say both; the head's call is the better one (measured in
    docs/training-experiments.md), so the contradicting sentence goes. A sentence contradicts
    when the report labeler reads a stated-absent finding in it as present or possible, or a
    stated-present one as absent."""
    kept = []
    for sentence in _SENTENCE_END.split(prose.strip()):
        read = label_report(sentence)
        if not any(_contradicts(stated[obs], read[obs]) for obs in stated):
            kept.append(sentence)
    return " ".join([checklist_text(stated), *kept]).strip()


def _contradicts(stated: str, read: str) -> bool:
    if stated == POSITIVE:
        return read == NEGATIVE
    return read in (POSITIVE, UNCERTAIN)


class FindingsReader:
    """The head as the runtime holds it: NumPy weights from a bundle file."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, cfg: FindingsHeadConfig) -> None:
        n = len(cfg.observations)
        if weight.ndim != 2 or weight.shape[0] != n or bias.shape != (n,):
            raise ValueError(
                f"findings head weights {weight.shape}/{bias.shape} do not match {n} observations"
            )
        self.weight, self.bias, self.cfg = weight.astype(np.float32), bias.astype(np.float32), cfg

    @classmethod
    def load(cls, path: str, cfg: FindingsHeadConfig) -> FindingsReader:
        from safetensors.numpy import load_file

        tensors = load_file(path)
        return cls(tensors[WEIGHT], tensors[BIAS], cfg)

    def logits(self, image_embeds: np.ndarray) -> np.ndarray:
        """[n_image_tokens, hidden] (one image) -> [n_observations]."""
        flat = np.asarray(image_embeds, dtype=np.float32).reshape(-1)
        if flat.shape[0] != self.weight.shape[1]:
            raise ValueError(
                f"the findings head reads {self.weight.shape[1]} numbers; the image has "
                f"{flat.shape[0]}"
            )
        return self.weight @ flat + self.bias

    def decisions(self, image_embeds: np.ndarray) -> dict[str, str]:
        return decisions(self.logits(image_embeds), self.cfg)
