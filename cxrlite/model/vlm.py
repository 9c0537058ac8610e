"""CXRVLM: vision encoder -> bridger -> Llama, and the vision tower alone (encoder + bridger).

The LLM sees one sequence of embeddings: text token embeddings, with the positions of the
(expanded) image token overwritten by the image embeddings in order (masked_scatter), exactly as
transformers' LlavaForConditionalGeneration does — so an MLP-bridger checkpoint exports to LLaVA
by renaming weights, and runtimes only need `encode_image` plus an LLM that accepts embeddings.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cxrlite.model.bridger import build_bridger
from cxrlite.model.config import ModelConfig
from cxrlite.model.language import build_llm
from cxrlite.model.vision import build_vision, select_features


class CXRVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision(cfg.vision, load_pretrained)
        self.bridger = build_bridger(cfg.bridger, cfg.vision.hidden_size, cfg.llm.hidden_size)
        self.llm = build_llm(cfg.llm, load_pretrained)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] normalised pixels -> [B, n_image_tokens, llm hidden] image embeddings."""
        dtype = next(self.vision.parameters()).dtype
        outputs = self.vision(pixel_values=pixels.to(dtype), output_hidden_states=True)
        return self.bridger(select_features(self.vision, outputs, self.cfg.vision))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image-token positions replaced by image embeddings.

        Images fill the image-token runs in batch order, so `pixels` (or precomputed
        `image_embeds`, [n_images, n_image_tokens, hidden]) holds one image per run."""
        table = self.llm.get_input_embeddings()
        if image_embeds is None and pixels is None:
            return table(input_ids)
        if self.cfg.image_token_id is None:
            raise ValueError(
                "ModelConfig.image_token_id is unset; bind a tokenizer to the config first"
            )
        if image_embeds is None:
            image_embeds = self.encode_image(pixels)
        mask = input_ids == self.cfg.image_token_id
        # The image id may lie past the table (a chunk-encoded prompt's placeholder).
        embeds = table(input_ids.masked_fill(mask, 0))
        n_positions, n_embeds = int(mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
        if n_positions != n_embeds:
            raise ValueError(
                f"{n_positions} image-token positions but {n_embeds} image embeddings "
                f"({image_embeds.shape[0]} images x {image_embeds.shape[1]}); expand the image token "
                "with cxrlite.model.tokenizer.expand_image_tokens"
            )
        return embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> Any:
        """transformers CausalLMOutputWithPast; `labels` are the input ids with -100 where no loss
        is taken (the shift by one happens inside)."""
        embeds = self.embed_inputs(input_ids, pixels, image_embeds)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            labels=labels,
            output_hidden_states=output_hidden_states,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        image_embeds: torch.Tensor | None = None,
        eos_token_id: int | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Greedy decoding; returns only the new token ids [B, <= max_new_tokens]. Batches must be
        left-padded."""
        embeds = self.embed_inputs(input_ids, pixels, image_embeds)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        eos = self.cfg.llm.eos_token_id if eos_token_id is None else eos_token_id
        pad = self.cfg.llm.pad_token_id if self.cfg.llm.pad_token_id is not None else eos
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            **generate_kwargs,
        )


class VisionTower(nn.Module):
    """The vision encoder and bridger of a CXRVLM, without its LLM (a 7B LLM need not be loaded
    to export or run a 400M-parameter vision tower)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision(cfg.vision, load_pretrained=False)
        self.bridger = build_bridger(cfg.bridger, cfg.vision.hidden_size, cfg.llm.hidden_size)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # CXRVLM.encode_image reads only .vision, .bridger and .cfg: reusing it (rather than a
        # copy of its body) keeps the exported graph identical to what the model computes.
        return CXRVLM.encode_image(self, pixels)  # type: ignore[arg-type]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_image(pixels)
