"""MedGemma 4B-it (google/medgemma-4b-it), read as published, into a bundle.

The folder is transformers' Gemma3ForConditionalGeneration (no remote code), which this follows:
- config.json (model_type "gemma3"): text_config (Gemma 3: head_dim 256, sliding-window layers
  with every 6th global, linear rope scaling on the global layers, local rope base, query scale
  1/sqrt(head_dim), tied output head), vision_config (SigLIP at 896 px, patch 14, its last layer
  through post_layernorm), mm_tokens_per_image (the 64 x 64 patch grid average-pooled to 16 x 16),
  image_token_index, boi/eoi_token_index, eos_token_id [<eos>, <end_of_turn>]. Fields at their
  default may be left out, so they are read through transformers' own Gemma3Config.
- model-*.safetensors + index: `language_model.model.*`, `vision_tower.vision_model.*`,
  `multi_modal_projector.{mm_soft_emb_norm.weight, mm_input_projection_weight}` (transformers
  4.50's names; transformers 5's `model.language_model.*` etc. are read too).
- preprocessor_config.json: Gemma3ImageProcessor (both sides to 896 px, bilinear, /255, mean and
  std 0.5, no pan-and-scan).
- tokenizer files and chat_template.json: Gemma 3's template puts "<start_of_image>" where the
  image goes, and Gemma3Processor replaces it by "\\n\\n<start_of_image>" + mm_tokens_per_image
  x "<image_soft_token>" + "<end_of_image>\\n\\n". The bundle's template writes that sequence
  with one soft token, which cxrlite expands like every image token: the same ids.
The LLM runs in llama.cpp as "gemma3", its image tokens attending to each other both ways.
Supported: a report (MedGemma's own prompt: "You are an expert radiologist." + "Describe this
X-ray"), written as findings; there is no separate impression task.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cxrlite.bundle import Bundle
from cxrlite.export.importers.common import (
    License,
    PublishedModelError,
    check_shapes,
    expect,
    expected_shapes,
    folder_hashes,
    load_safetensors_folder,
    provenance,
    read_json,
    require_files,
    require_license,
    write_bundle,
)
from cxrlite.imaging.preprocess import PreprocessConfig
from cxrlite.model.config import BridgerConfig, LLMConfig, ModelConfig, VisionConfig

NAME = "MedGemma"
LICENSE = License(
    "Health AI Developer Foundations Terms of Use",
    "not a medical device: outputs need independent verification and clinical validation before "
    "any clinical use; the Prohibited Use Policy applies; redistribution carries the same terms",
)
FILES = ("config.json", "preprocessor_config.json", "tokenizer_config.json", "tokenizer.model")
SYSTEM_PROMPT = "You are an expert radiologist."
# The model card's report request; the system prompt becomes a prefix of the first user turn in
# Gemma 3's template, so it is written into the prompt (text parts are trimmed: same text).
FINDINGS_PROMPT = SYSTEM_PROMPT + "\n\nDescribe this X-ray<image>"
IMAGE_TOKEN = "<image_soft_token>"
_TEMPLATE_IMAGE = "{{ '<start_of_image>' }}"
_TEMPLATE_IMAGE_EXPANDED = "{{ '\\n\\n<start_of_image>" + IMAGE_TOKEN + "<end_of_image>\\n\\n' }}"
BILINEAR = 2  # PIL's resample code in preprocessor_config.json
# published prefix -> ours: transformers 4.50's names (MedGemma's), then transformers 5's
_PREFIXES = (
    ("language_model.model.", "llm.model."),
    ("language_model.lm_head.", "llm.lm_head."),
    ("vision_tower.vision_model.", "vision."),
    ("multi_modal_projector.", "bridger."),
    ("model.language_model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
    ("model.vision_tower.", "vision."),
    ("model.multi_modal_projector.", "bridger."),
)


def _hf_config(config: dict[str, Any], path: Path) -> Any:
    """Gemma3Config with transformers' defaults and its reading of the legacy rope fields."""
    from transformers import Gemma3Config

    expect(path, "model_type", config.get("model_type"), ["gemma3"])
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    expect(path, "text_config.model_type", text.get("model_type", "gemma3_text"), ["gemma3_text"])
    expect(path, "vision_config.model_type", vision.get("model_type"), ["siglip_vision_model"])
    drop = ("architectures", "torch_dtype", "transformers_version", "_name_or_path")
    try:
        return Gemma3Config(**{k: v for k, v in config.items() if k not in drop})
    except (TypeError, ValueError, KeyError) as e:
        raise PublishedModelError(f"{path}: not a Gemma 3 configuration ({e})") from None


def _llm_config(hf: Any, end_of_turn: int, path: Path) -> LLMConfig:
    from cxrlite.model.language import gemma3_layer_types

    t = hf.text_config
    expect(path, "text_config.hidden_activation", t.hidden_activation, ["gelu_pytorch_tanh"])
    expect(path, "text_config.final_logit_softcapping", t.final_logit_softcapping, [None])
    expect(path, "text_config.attn_logit_softcapping", t.attn_logit_softcapping, [None])
    expect(path, "text_config.attention_bias", t.attention_bias, [False])
    expect(path, "text_config.use_bidirectional_attention", t.use_bidirectional_attention, [False])
    # llama.cpp scales queries by 1/sqrt(head_dim) for every Gemma 3 but the 27B
    expect(path, "text_config.query_pre_attn_scalar", t.query_pre_attn_scalar, [t.head_dim])
    expect(
        path, "text_config.layer_types", t.layer_types, [gemma3_layer_types(t.num_hidden_layers)]
    )
    rope = t.rope_parameters
    full, local = dict(rope["full_attention"]), dict(rope["sliding_attention"])
    expect(path, "sliding-window rope type", local.get("rope_type"), ["default"])
    expect(path, "global rope type", full.get("rope_type"), ["default", "linear"])
    theta = float(full.pop("rope_theta"))
    return LLMConfig(
        arch="gemma3", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
        num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
        num_kv_heads=t.num_key_value_heads, head_dim=t.head_dim,
        intermediate_size=t.intermediate_size, max_position_embeddings=t.max_position_embeddings,
        rope_theta=theta, rope_scaling=full if full["rope_type"] != "default" else None,
        sliding_window=t.sliding_window, rope_local_theta=float(local["rope_theta"]),
        rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=bool(t.tie_word_embeddings),
        bos_token_id=t.bos_token_id,
        # the chat turn's end; the engine stops at the tokenizer's <eos> as well
        eos_token_id=end_of_turn, pad_token_id=t.pad_token_id,
    )  # fmt: skip


def _vision_config(hf: Any, path: Path) -> VisionConfig:
    v = hf.vision_config
    expect(path, "vision_config.vision_use_head", v.vision_use_head, [False])
    return VisionConfig(
        kind="siglip", image_size=v.image_size, patch_size=v.patch_size,
        num_channels=v.num_channels, hidden_size=v.hidden_size, num_layers=v.num_hidden_layers,
        num_heads=v.num_attention_heads, intermediate_size=v.intermediate_size,
        feature_layer=-1, feature_norm=True, hidden_act=v.hidden_act,
        layer_norm_eps=v.layer_norm_eps,
    )  # fmt: skip


def _preprocess(path: Path, vision: VisionConfig) -> PreprocessConfig:
    spec = read_json(path)
    expect(path, "image_processor_type", spec.get("image_processor_type"),
           ["Gemma3ImageProcessor"])  # fmt: skip
    expect(path, "resample", spec.get("resample"), [BILINEAR])
    expect(path, "do_pan_and_scan", bool(spec.get("do_pan_and_scan")), [False])
    for flag in ("do_resize", "do_rescale", "do_normalize"):
        expect(path, flag, spec.get(flag), [True])
    size = spec.get("size") or {}
    if (size.get("height"), size.get("width")) != (vision.image_size, vision.image_size):
        raise PublishedModelError(
            f"{path}: resize to {size}; the vision tower takes {vision.image_size} px"
        )
    return PreprocessConfig(
        image_size=vision.image_size, channels=vision.num_channels,
        mean=tuple(spec["image_mean"]), std=tuple(spec["image_std"]), resize="stretch",
        interpolation="bilinear",
    )  # fmt: skip


def _tokenizer(src: Path, hf: Any) -> tuple[Any, int]:
    """The tokenizer with the bundle's template (the image expanded as Gemma3Processor does),
    and the id of <end_of_turn>; every id the config names is checked against it."""
    from cxrlite.model.tokenizer import TokenizerError, load_tokenizer

    try:
        tokenizer = load_tokenizer(src)
    except TokenizerError as e:
        raise PublishedModelError(str(e)) from None
    template = getattr(tokenizer, "chat_template", None)
    for name in ("chat_template.json", "chat_template.jinja"):
        if not template and (src / name).is_file():
            template = (
                read_json(src / name).get("chat_template")
                if name.endswith(".json")
                else (src / name).read_text(encoding="utf-8")
            )
    if not isinstance(template, str) or template.count(_TEMPLATE_IMAGE) != 1:
        raise PublishedModelError(
            f"{src}: no Gemma 3 chat template placing one {_TEMPLATE_IMAGE} (chat_template.json)"
        )
    tokenizer.chat_template = template.replace(_TEMPLATE_IMAGE, _TEMPLATE_IMAGE_EXPANDED)
    config = src / "config.json"
    for token, field in ((IMAGE_TOKEN, "image_token_index"), ("<start_of_image>", "boi_token_index"),
                         ("<end_of_image>", "eoi_token_index")):  # fmt: skip
        value = getattr(hf, field.replace("_index", "_id"), None)
        if tokenizer.convert_tokens_to_ids(token) != value:
            raise PublishedModelError(f"{config}: {field} {value} is not the tokenizer's {token}")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    if end_of_turn in (None, tokenizer.unk_token_id):
        raise PublishedModelError(f"{src}: the tokenizer has no <end_of_turn>")
    return tokenizer, end_of_turn


def _convert(state: dict[str, torch.Tensor], tied: bool, src: Path) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, tensor in state.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p[0])), None)
        if prefix is None:
            unknown.append(key)
            continue
        ours = prefix[1] + key.removeprefix(prefix[0])
        if not (tied and ours == "llm.lm_head.weight"):  # the embeddings serve as the head
            out[ours] = tensor
    if unknown:
        raise PublishedModelError(f"{src}: unexpected weights {sorted(unknown)[:4]}")
    return out


def import_medgemma(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    accept_license: bool = False,
    checkpoint_out: str | os.PathLike | None = None,
    revision: str | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Convert MedGemma (`src`) into a bundle at `out`, and the cxrlite checkpoint it is
    exported from at `checkpoint_out` (default: `<out>-checkpoint`)."""
    src, out = Path(src), Path(out)
    require_license(NAME, LICENSE, accept_license)
    require_files(src, FILES, f"{NAME} folder")
    path = src / "config.json"
    hf = _hf_config(read_json(path), path)
    tokenizer, end_of_turn = _tokenizer(src, hf)
    vision = _vision_config(hf, path)
    try:
        cfg = ModelConfig(
            vision=vision,
            bridger=BridgerConfig(kind="gemma3", tokens_per_image=hf.mm_tokens_per_image),
            llm=_llm_config(hf, end_of_turn, path),
            preprocess=_preprocess(src / "preprocessor_config.json", vision).to_dict(),
            image_token=IMAGE_TOKEN, image_token_id=hf.image_token_id, prompt_template="own",
            prompt_encoding="whole",
            report_prompts={"findings": FINDINGS_PROMPT, "impression": None},
        )  # fmt: skip
    except ValueError as e:
        raise PublishedModelError(f"{path}: {e}") from None
    state = _convert(
        load_safetensors_folder(src, f"{NAME} folder"), cfg.llm.tie_word_embeddings, src
    )
    expected = expected_shapes(cfg)
    if cfg.llm.tie_word_embeddings:
        expected.pop("llm.lm_head.weight", None)
    check_shapes(state, expected, src)
    record = provenance(NAME, LICENSE, revision, {"model": (src, folder_hashes(src))})
    record["task"] = "a report of a chest X-ray as the model writes it (findings)"
    return write_bundle(
        state, tokenizer, cfg, out=out,
        checkpoint_out=checkpoint_out,
        record=record, overwrite=overwrite,
    )  # fmt: skip
