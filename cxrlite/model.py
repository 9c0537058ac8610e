"""CXRVLM: vision encoder -> bridger -> Llama, plus checkpoint save/load and LLaVA export.

The LLM sees one sequence of embeddings: text token embeddings, with the positions of the
(expanded) image token overwritten by the image embeddings in order (masked_scatter), exactly as
transformers' LlavaForConditionalGeneration does — so an MLP-bridger checkpoint exports to LLaVA
by renaming weights, and runtimes only need `encode_image` plus an LLM that accepts embeddings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrlite.bridger import build_bridger
from cxrlite.config import ModelConfig
from cxrlite.fileio import atomic_dir, write_json
from cxrlite.language import build_llm, hf_llama_config
from cxrlite.vision import build_vision, hf_vision_config, select_features

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "cxrlite-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete, corrupt or of another format."""


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
        return self.bridger(select_features(outputs, self.cfg.vision))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the image-token positions replaced by image embeddings.

        Images fill the image-token runs in batch order, so `pixels` (or precomputed
        `image_embeds`, [n_images, n_image_tokens, hidden]) holds one image per run."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if image_embeds is None and pixels is None:
            return embeds
        if self.cfg.image_token_id is None:
            raise ValueError(
                "ModelConfig.image_token_id is unset; bind a tokenizer to the config first"
            )
        if image_embeds is None:
            image_embeds = self.encode_image(pixels)
        mask = input_ids == self.cfg.image_token_id
        n_positions, n_embeds = int(mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
        if n_positions != n_embeds:
            raise ValueError(
                f"{n_positions} image-token positions but {n_embeds} image embeddings "
                f"({image_embeds.shape[0]} images x {image_embeds.shape[1]}); expand the image token "
                "with cxrlite.tokenizer.expand_image_tokens"
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


# --- checkpoints --------------------------------------------------------------------------------


LLAVA_MARKER_FILE = "cxrlite_export.json"


def _is_ours(path: Path) -> bool:
    """A folder this module wrote (a checkpoint or a LLaVA export), which may be replaced."""
    if (path / LLAVA_MARKER_FILE).is_file():
        return True
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        return isinstance(data, dict) and data.get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError):
        return False


def _tied(llm: nn.Module) -> bool:
    out, emb = llm.get_output_embeddings(), llm.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def _weights_for_saving(model: CXRVLM) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if _tied(model.llm):  # safetensors refuses shared storage; load() re-ties it
        state.pop("llm.lm_head.weight", None)
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def save(model: CXRVLM, tokenizer: Any, cfg: ModelConfig, out_dir: str | os.PathLike) -> Path:
    """Write an HF-style checkpoint folder atomically: config.json, model.safetensors, tokenizer."""
    from safetensors.torch import save_file

    from cxrlite.tokenizer import save_tokenizer

    with atomic_dir(out_dir, _is_ours) as tmp:
        write_json(
            tmp / CONFIG_FILE,
            {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict()},
        )
        save_file(_weights_for_saving(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_tokenizer(tokenizer, tmp)
    logger.info("saved checkpoint %s", out_dir)
    return Path(out_dir)


def load_config(ckpt_dir: str | os.PathLike) -> ModelConfig:
    path = Path(ckpt_dir)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {CONFIG_FILE}; not a cxrlite checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: unreadable ({e})") from None
    if not isinstance(data, dict) or data.pop("format", None) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: {CONFIG_FILE} is not a cxrlite checkpoint config")
    version = data.pop("format_version", None)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version!r} is not supported")
    try:
        return ModelConfig.from_dict(data)
    except ValueError as e:
        raise CheckpointError(f"{path / CONFIG_FILE}: {e}") from None


def load_weights(ckpt_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(ckpt_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS_FILE}")
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable ({e})") from None


def _no_init_weights() -> contextlib.AbstractContextManager:
    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights  # transformers 4
    return no_init_weights()


def load(
    ckpt_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[CXRVLM, Any, ModelConfig]:
    """(model in eval mode, tokenizer, config) from a folder written by `save`."""
    from cxrlite.tokenizer import load_tokenizer

    cfg = load_config(ckpt_dir)
    state = load_weights(ckpt_dir)
    # Every parameter is overwritten below; random init would cost ~40 s on a 1B model.
    with _no_init_weights():
        model = CXRVLM(cfg, load_pretrained=False)
    if cfg.llm.tie_word_embeddings:
        model.llm.tie_weights()  # done by init_weights, which no_init_weights skips
    result = model.load_state_dict(state, strict=False)
    missing = [
        k for k in result.missing_keys if not (k == "llm.lm_head.weight" and _tied(model.llm))
    ]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{ckpt_dir}: weights do not match the config (missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    model.to(device=device, dtype=dtype).eval()
    return model, load_tokenizer(ckpt_dir), cfg


# --- LLaVA export --------------------------------------------------------------------------------

# Our names -> the llava-hf checkpoint layout (language_model.model.*, vision_tower.vision_model.*):
# transformers 5 converts it on load (tested), older transformers and vLLM read it as it is.
LLAVA_RENAMES = (
    ("vision.", "vision_tower.vision_model."),
    ("bridger.", "multi_modal_projector."),
    ("llm.model.", "language_model.model."),
    ("llm.lm_head.", "language_model.lm_head."),
)


def _llava_name(name: str) -> str:
    for ours, theirs in LLAVA_RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    raise CheckpointError(f"no LLaVA name for weight {name!r}")


def export_llava(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write an MLP-bridger checkpoint as transformers' LlavaForConditionalGeneration folder
    (config.json, model.safetensors, tokenizer) for transformers / vLLM users."""
    from safetensors.torch import save_file
    from transformers import LlavaConfig

    from cxrlite.tokenizer import load_tokenizer, save_tokenizer

    cfg = load_config(ckpt_dir)
    if cfg.bridger.kind != "mlp":
        raise ValueError(
            f"LLaVA has an MLP projector; {ckpt_dir} uses a {cfg.bridger.kind} bridger"
        )
    if cfg.image_token_id is None:
        raise CheckpointError(f"{ckpt_dir}: config has no image_token_id")
    llava_config = LlavaConfig(
        vision_config=hf_vision_config(cfg.vision).to_dict(),
        text_config=hf_llama_config(cfg.llm).to_dict(),
        image_token_index=cfg.image_token_id,
        image_seq_length=cfg.n_image_tokens,
        vision_feature_layer=cfg.vision.feature_layer,
        vision_feature_select_strategy=cfg.vision.select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=cfg.llm.tie_word_embeddings,
    )
    llava_config.architectures = ["LlavaForConditionalGeneration"]
    state = load_weights(ckpt_dir)
    tokenizer = load_tokenizer(ckpt_dir)
    with atomic_dir(out_dir, _is_ours) as tmp:
        llava_config.save_pretrained(tmp)
        renamed = {_llava_name(name): tensor for name, tensor in state.items()}
        save_file(renamed, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        save_tokenizer(tokenizer, tmp)
        write_json(tmp / LLAVA_MARKER_FILE, {"format": "cxrlite-llava-export", "format_version": 1})
    logger.info("exported %s as LLaVA to %s", ckpt_dir, out_dir)
    return Path(out_dir)
