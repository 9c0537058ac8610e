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
from cxrlite.model.language import build_llm, image_attention_masks
from cxrlite.model.vision import build_vision, select_features


class FindingsHead(nn.Module):
    """[B, n_image_tokens, hidden] image embeddings -> [B, n_observations] logits: the findings
    checklist's linear read (cxrlite.model.findings)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.findings_head is None:
            raise ValueError("ModelConfig.findings_head is unset")
        self.linear = nn.Linear(cfg.image_embedding_size, len(cfg.findings_head.observations))

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.linear(image_embeds.flatten(1).float())


class CXRVLM(nn.Module):
    def __init__(self, cfg: ModelConfig, load_pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision(cfg.vision, load_pretrained)
        self.bridger = build_bridger(cfg.bridger, cfg.vision, cfg.llm.hidden_size)
        self.llm = build_llm(cfg.llm, load_pretrained)
        # Fitted after training (train/findings_head.py); states the findings checklist.
        self.findings_head = FindingsHead(cfg) if cfg.findings_head is not None else None

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
        masks = self._image_masks(input_ids, embeds, attention_mask)
        return self.llm(
            inputs_embeds=embeds,
            attention_mask=masks if masks is not None else attention_mask,
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
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        masks = self._image_masks(input_ids, embeds, attention_mask, positions)
        if masks is not None:
            return self._greedy(embeds, attention_mask, positions, masks, max_new_tokens, eos, pad)
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
            **generate_kwargs,
        )

    def _image_masks(
        self,
        input_ids: torch.Tensor,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        positions: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor] | None:
        if self.cfg.image_token_id is None:
            return None
        image = input_ids == self.cfg.image_token_id
        return image_attention_masks(self.llm, embeds, image, attention_mask, positions)

    def _greedy(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        positions: torch.Tensor,
        masks: dict[str, torch.Tensor],
        max_new_tokens: int,
        eos: int,
        pad: int,
    ) -> torch.Tensor:
        """Greedy decoding after a prompt prefilled with its own masks (an image attended to
        both ways), which transformers' generate cannot take; the steps after it are causal.
        Returns what generate would: new ids, EOS included, `pad` after a finished row."""
        out = self.llm(
            inputs_embeds=embeds, attention_mask=masks, position_ids=positions, use_cache=True
        )
        done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        position = positions[:, -1:]
        tokens = []
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1).masked_fill(done, pad)
            tokens.append(token)
            done |= token == eos
            if bool(done.all()) or len(tokens) == max_new_tokens:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(token), 1)], 1)
            position = position + 1
            out = self.llm(
                input_ids=token[:, None], attention_mask=attention_mask, position_ids=position,
                cache=out.past_key_values, use_cache=True,
            )  # fmt: skip
        return torch.stack(tokens, dim=1)


class VisionTower(nn.Module):
    """The vision encoder and bridger of a CXRVLM, without its LLM (a 7B LLM need not be loaded
    to export or run a 400M-parameter vision tower)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = build_vision(cfg.vision, load_pretrained=False)
        self.bridger = build_bridger(cfg.bridger, cfg.vision, cfg.llm.hidden_size)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        # CXRVLM.encode_image reads only .vision, .bridger and .cfg: reusing it (rather than a
        # copy of its body) keeps the exported graph identical to what the model computes.
        return CXRVLM.encode_image(self, pixels)  # type: ignore[arg-type]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_image(pixels)
