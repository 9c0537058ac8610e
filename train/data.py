"""Map-style datasets and collators for the four stages.

Images are decoded and preprocessed once (the same `preprocess` used at serving time) and kept
in memory as float16: phantom sets of a few thousand 128 px images fit in ~100 MB, and the
stages then spend their CPU time on the model instead of on PNG decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS, POSITIVE, UNCERTAIN
from cxrlite.data.records import Study, TaskRecord
from cxrlite.eval.labeler import label_report
from cxrlite.imaging.decode import load_image
from cxrlite.imaging.preprocess import PreprocessConfig, preprocess
from cxrlite.model.tokenizer import encode_example
from cxrlite.progress import progress_bar

logger = logging.getLogger(__name__)
IGNORE = -100
_NO_LABELS = (torch.zeros(len(CHEXPERT_OBSERVATIONS)), torch.zeros(len(CHEXPERT_OBSERVATIONS)))


class ImageStore:
    """Preprocessed pixels by image path, decoded once; [C, S, S] float16 each."""

    def __init__(self, paths: Sequence[str], cfg: PreprocessConfig) -> None:
        unique = sorted(set(paths))
        self.index = {p: i for i, p in enumerate(unique)}
        self.pixels = torch.empty(
            (len(unique), cfg.channels, cfg.image_size, cfg.image_size), dtype=torch.float16
        )
        with progress_bar("decoding images", total=len(unique)) as advance:
            for i, path in enumerate(unique):
                self.pixels[i] = torch.from_numpy(
                    preprocess(load_image(path).pixels, cfg).astype(np.float16)
                )
                advance()
        logger.info("image store: %d images, %.0f MB", len(unique), self.pixels.numel() * 2 / 2**20)

    def __getitem__(self, path: str) -> torch.Tensor:
        return self.pixels[self.index[path]].float()


class TextDataset(torch.utils.data.Dataset):
    """Stage 0: next-token training on clinical text (every token is a target)."""

    def __init__(self, texts: Sequence[str], tokenizer: Any, max_len: int) -> None:
        self.items = []
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=True)[: max_len - 1] + [
                tokenizer.eos_token_id
            ]
            self.items.append({"input_ids": ids, "labels": list(ids)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


def report_label_targets(text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The 14 observations the report labeler reads from `text`: (target, mask) with positive = 1,
    negative or not mentioned = 0, uncertain masked out."""
    found = label_report(text)
    target = torch.tensor([float(found[o] == POSITIVE) for o in CHEXPERT_OBSERVATIONS])
    mask = torch.tensor([float(found[o] != UNCERTAIN) for o in CHEXPERT_OBSERVATIONS])
    return target, mask


class ImageTextDataset(torch.utils.data.Dataset):
    """Stage 1: (image, report tokens, report labels) for contrastive + captioning + label training.

    The labels are read from the report text by the report labeler (positive = 1, negative or not
    mentioned = 0, uncertain = masked out), so real datasets with reports work the same way."""

    def __init__(
        self, studies: Sequence[Study], images: ImageStore, tokenizer: Any, max_len: int
    ) -> None:
        self.images = images
        self.items = []
        for study in studies:
            text = study.narrative
            ids = tokenizer.encode(text, add_special_tokens=True)[: max_len - 1]
            target, mask = report_label_targets(text)
            self.items.append((study.image, ids + [tokenizer.eos_token_id], target, mask))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, ids, target, mask = self.items[i]
        return {
            "pixels": self.images[image],
            "input_ids": ids,
            "labels": list(ids),
            "report_labels": target,
            "report_label_mask": mask,
        }


class InstructionDataset(torch.utils.data.Dataset):
    """Stages 2 and 3: prompt (+ image) -> answer, loss on the answer tokens only.

    With `image_labels` (image path -> report_label_targets of its study), every item also
    carries its image's report labels (text-only items: all masked) for the report-label term."""

    def __init__(
        self,
        records: Sequence[TaskRecord],
        images: ImageStore | None,
        tokenizer: Any,
        n_image_tokens: int,
        max_len: int,
        image_labels: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        self.images = images
        self.image_labels = image_labels
        self.items = []
        dropped = 0
        for rec in records:
            if len(rec.images) > 1:
                raise ValueError(
                    f"task {rec.id}: {len(rec.images)} images; one image per example is supported"
                )
            enc = encode_example(
                tokenizer,
                rec.prompt,
                rec.answer,
                with_image=bool(rec.images),
                n_image_tokens=n_image_tokens,
            )
            if len(enc["input_ids"]) > max_len:
                dropped += 1  # truncating would cut the answer, the only supervised part
                continue
            self.items.append((rec.images[0] if rec.images else None, enc))
        if dropped:
            logger.warning(
                "dropped %d of %d examples longer than %d tokens", dropped, len(records), max_len
            )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, enc = self.items[i]
        item = dict(enc)
        if image is not None:
            item["pixels"] = self.images[image]
        if self.image_labels is not None:
            target, mask = _NO_LABELS if image is None else self.image_labels[image]
            item["report_labels"], item["report_label_mask"] = target, mask
        return item


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids/labels; stack the images of the examples that have one (in batch order,
    which is the order their image-token runs appear in, as CXRVLM.embed_inputs expects)."""
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    for key in ("report_labels", "report_label_mask"):
        if key in batch[0]:
            out[key] = torch.stack([b[key] for b in batch])
    pixels = [b["pixels"] for b in batch if "pixels" in b]
    if pixels:
        out["pixels"] = torch.stack(pixels)
    return out
