"""CXR-LLaVA v2 (ECOFRI/CXR-LLAVA-v2), read as published, into a bundle; its remote code never runs.

What was checked against the published code (github.com/ECOFRI/CXR_LLaVA at b7403b7, whose
CXR_LLAVA_HF/ files the Hugging Face repo carries), and followed here:
- CXR_LLAVA_HF/CXR_LLAVA_HF.py, CXRLLAVAModel.__init__: config.json (model_type "CXR-LLAVA")
  gives `clip_vision_cfg` (open_clip's CLIPVisionCfg fields), `clip_embed_dim`,
  `image_preprocess_cfg` (mean, std), `mm_projector_dim` and `llama` (LlamaConfig kwargs). The
  vision tower is open_clip's VisionTransformer with `in_channels=1`, nn.GELU (exact) and
  LayerNorm (eps 1e-5) unless act_kwargs / norm_kwargs say otherwise, heads = width //
  head_width; `mm_projector` is one nn.Linear; the LLM is a transformers LlamaModel (`llama.*`)
  with a separate, untied `lm_head`. Every part is cast to bf16 there; here they run in fp32.
- CXR_LLAVA_HF.py, encode_images: conv1, CLS + positional embedding, ln_pre, the resblocks, then
  (no attentional pool, final_ln_after_pool False) ln_post on every token and `_global_pool`'s
  tokens, x[:, 1:]: CLS dropped, 1024 image tokens at 512 px / patch 16. `proj` only projects
  the pooled CLS, which is never used. That is transformers' CLIPVisionModel (hidden_act "gelu")
  read at its last layer through post_layernorm, CLS dropped ("default").
- VisualTransformer.py: the block (ln_1, nn.MultiheadAttention's fused in_proj, out_proj, ln_2,
  mlp.c_fc / c_proj), no conv bias, `proj` of shape (width, clip_embed_dim).
- CXR_LLAVA_HF.py, the image processor: CLIPImageProcessor with shortest edge and centre crop
  at clip_vision_cfg.image_size, `resample=True` (= 1, Pillow's Lanczos), rescale 1/255, the
  config's mean and std, no RGB conversion; generate_cxr_repsonse first refuses any image with
  a value above 255 ("16-bit image is not supported") and converts to 8-bit gray ('L').
- CXR_LLAVA_HF.py, write_radiologic_report / generate_cxr_repsonse / tokenizer_image_token: the
  chat is [system "You are a helpful radiologist. ...", user "<image>\\nWrite a radiologic
  report ...\\n"], rendered by `tokenizer.apply_chat_template` with the slow LlamaTokenizer. Its
  tokenizer carries no chat template (a published run logs transformers' fallback warning; one
  that does is refused here), so transformers 4.36 (requirements.txt) renders LlamaTokenizer's
  default Llama-2 template: "<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n
  {content}" stripped, then " [/INST]". The text is split at "<image>" and each chunk
  tokenized with the tokenizer's BOS added; the first chunk's own "<s>" text then also becomes
  BOS, so the ids start with two BOS: reproduced here (the template writes one more `<s>`),
  as is the tokenizer's `legacy` setting (absent means legacy in transformers 4.36).
Generation there samples (temperature 0.2, top_p 0.8, at most 512 new tokens, stop at </s>);
cxrlite's report decodes greedily unless asked otherwise. There is one report task (no
separate impression): its report is the findings part, the impression None.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from cxrlite.bundle import Bundle
from cxrlite.export.importers import vit_keys
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
from cxrlite.model.config import BridgerConfig, ModelConfig, VisionConfig

NAME = "CXR-LLaVA"
LICENSE = License(
    "CC BY-NC 4.0 (CXR-LLaVA) with the Llama 2 Community License (its Llama-2-7B-chat base)",
    "research use only: non-commercial, no clinical use; obtain the Llama 2 licence from Meta",
)
FILES = ("config.json", "tokenizer.model", "tokenizer_config.json")
# CXR_LLAVA_HF.py, write_radiologic_report: the system message and the user's text after
# "<image>\n" (its trailing newline is stripped with the rest of the message when rendered)
SYSTEM_PROMPT = (
    "You are a helpful radiologist. Try to interpret chest x ray image and answer to the question "
    "that user provides."
)
FINDINGS_PROMPT = (
    "Write a radiologic report on the given chest radiograph, including information about "
    "atelectasis, cardiomegaly, consolidation, pulmonary edema, pleural effusion, and "
    "pneumothorax.\n"
)
# open_clip's CLIPVisionCfg (CXR_LLAVA_HF.py) with its defaults; other keys fail there
CLIP_VISION_DEFAULTS: dict[str, Any] = {
    "layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
    "image_size": 224, "ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False,
    "attn_pooler_queries": 256, "attn_pooler_heads": 8, "no_ln_pre": False,
    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
    "output_tokens": False, "act_kwargs": None, "norm_kwargs": None, "timm_model_name": None,
    "timm_model_pretrained": False, "timm_pool": "avg", "timm_proj": "linear",
    "timm_proj_bias": False, "timm_drop": 0.0, "timm_drop_path": None,
}  # fmt: skip
# what encode_images reads as tokens: x[:, 1:] after ln_post, with no pooler and no LayerScale
CLIP_VISION_REQUIRED: dict[str, list[Any]] = {
    "timm_model_name": [None], "ls_init_value": [None], "attentional_pool": [False],
    "no_ln_pre": [False], "pos_embed_type": ["learnable"], "final_ln_after_pool": [False],
    "pool_type": ["tok", "avg"], "act_kwargs": [None],
}  # fmt: skip
# LlamaConfig's architecture fields (transformers 4.36's defaults equal transformers 5's)
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "attention_bias", "mlp_bias", "head_dim", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "pad_token_id",
)  # fmt: skip
PROJECTOR_KEYS = {"mm_projector.weight": "linear_1.weight", "mm_projector.bias": "linear_1.bias"}
OPEN_CLIP_LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, open_clip's LayerNorm


def chat_template(system: str) -> str:
    """Jinja for what CXR-LLaVA's code tokenizes: one BOS (the tokenizer's own) before the Llama-2
    chat that transformers 4.36's default LlamaTokenizer template renders, `system` as the
    system message unless the chat brings one, an image part as "<image>\\n"."""
    literal = system.replace("\\", "\\\\").replace("'", "\\'")
    return (
        "{{ bos_token }}"
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system_message = '" + literal + "' %}"
        "{% set loop_messages = messages %}{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['content'] is string %}{% set text = message['content'] %}"
        "{% else %}{% set ns = namespace(text='') %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{% set ns.text = ns.text + '<image>\\n' %}"
        "{% elif part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}{% endif %}"
        "{% endfor %}{% set text = ns.text %}{% endif %}"
        "{% if loop.first %}"
        "{% set text = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + text %}{% endif %}"
        "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + text | trim + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + text | trim + ' ' + eos_token }}"
        "{% endif %}{% endfor %}"
    )


def _vision(clip: Any, path: Path) -> VisionConfig:
    if not isinstance(clip, dict):
        raise PublishedModelError(f"{path}: needs a clip_vision_cfg object")
    unknown = sorted(set(clip) - set(CLIP_VISION_DEFAULTS))
    if unknown:
        raise PublishedModelError(f"{path}: clip_vision_cfg has unknown fields {unknown}")
    spec = {**CLIP_VISION_DEFAULTS, **clip}
    for field, allowed in CLIP_VISION_REQUIRED.items():
        expect(path, f"clip_vision_cfg.{field}", spec[field], allowed)
    for field in ("layers", "width", "head_width", "patch_size", "image_size"):
        value = spec[field]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PublishedModelError(
                f"{path}: clip_vision_cfg.{field} is {value!r}; this importer reads a positive "
                "integer (a square ViT)"
            )
    norm = spec["norm_kwargs"] or {}
    if set(norm) - {"eps"}:
        raise PublishedModelError(f"{path}: clip_vision_cfg.norm_kwargs {norm} (only eps is read)")
    width, head_width = spec["width"], spec["head_width"]
    if width % head_width:
        raise PublishedModelError(f"{path}: width {width} is not a multiple of {head_width}")
    try:
        return VisionConfig(
            kind="clip", image_size=spec["image_size"], patch_size=spec["patch_size"],
            num_channels=1, hidden_size=width, num_layers=spec["layers"],
            num_heads=width // head_width, intermediate_size=int(width * spec["mlp_ratio"]),
            feature_layer=-1, feature_norm=True, hidden_act="gelu",
            layer_norm_eps=float(norm.get("eps", OPEN_CLIP_LAYER_NORM_EPS)),
        )  # fmt: skip
    except (TypeError, ValueError) as e:
        raise PublishedModelError(f"{path}: clip_vision_cfg is invalid ({e})") from None


def _llm(config: dict[str, Any], path: Path) -> Any:
    from transformers import LlamaConfig

    from cxrlite.model.language import llm_config_from_hf

    llama = config.get("llama")
    if not isinstance(llama, dict):
        raise PublishedModelError(f"{path}: needs a llama object (the LlamaConfig)")
    expect(path, "llama.model_type", llama.get("model_type", "llama"), ["llama"])
    expect(path, "llama.hidden_act", llama.get("hidden_act", "silu"), ["silu"])
    try:  # the architecture's fields only: a saved config's dump carries generic ones too
        hf = LlamaConfig(**{k: llama[k] for k in LLAMA_FIELDS if k in llama})
        llm = llm_config_from_hf(hf, path)
    except (TypeError, ValueError) as e:
        raise PublishedModelError(f"{path}: llama is invalid ({e})") from None
    # lm_head is its own nn.Linear beside LlamaModel: never tied to the embeddings
    return dataclasses.replace(llm, tie_word_embeddings=False)


def _preprocess(config: dict[str, Any], vision: VisionConfig, path: Path) -> PreprocessConfig:
    spec = config.get("image_preprocess_cfg")
    if not isinstance(spec, dict):
        raise PublishedModelError(f"{path}: needs an image_preprocess_cfg object (mean, std)")
    values = []
    for name in ("mean", "std"):
        value = spec.get(name)
        value = value[0] if isinstance(value, list) and len(value) == 1 else value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PublishedModelError(
                f"{path}: image_preprocess_cfg.{name} is {spec.get(name)!r}; expected one number "
                "(one gray channel)"
            )
        values.append(float(value))
    try:
        return PreprocessConfig(
            image_size=vision.image_size, channels=1, mean=values[0], std=values[1],
            resize="crop", interpolation="lanczos",
        )  # fmt: skip
    except ValueError as e:
        raise PublishedModelError(f"{path}: image_preprocess_cfg is invalid ({e})") from None


def _model_config(src: Path, config: dict[str, Any]) -> tuple[ModelConfig, int]:
    """The ModelConfig, and open_clip's output_dim (the unused `proj`'s width)."""
    path = src / "config.json"
    expect(path, "model_type", config.get("model_type"), ["CXR-LLAVA"])
    vision = _vision(config.get("clip_vision_cfg"), path)
    llm = _llm(config, path)
    if config.get("mm_projector_dim") != vision.hidden_size:
        raise PublishedModelError(
            f"{path}: mm_projector_dim {config.get('mm_projector_dim')!r} but the vision tower's "
            f"tokens are {vision.hidden_size} wide"
        )
    embed_dim = config.get("clip_embed_dim")
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, int) or embed_dim <= 0:
        raise PublishedModelError(f"{path}: clip_embed_dim {embed_dim!r} is not a width")
    cfg = ModelConfig(
        vision=vision,
        bridger=BridgerConfig(kind="mlp", mlp_layers=1),
        llm=llm,
        preprocess=_preprocess(config, vision, path).to_dict(),
        image_token_id=llm.vocab_size,  # LLaVA's IMAGE_TOKEN_INDEX: never looked up
        prompt_template="own",
        prompt_encoding="chunks",
        report_prompts={"findings": FINDINGS_PROMPT, "impression": None},
    )
    return cfg, embed_dim


def _convert(
    state: dict[str, torch.Tensor], cfg: ModelConfig, embed_dim: int, src: Path
) -> dict[str, torch.Tensor]:
    """Published names -> ours: llm.model.* and llm.lm_head, vision.* (CLIPVisionModel),
    bridger.linear_1; open_clip's `proj` is checked and left out (nothing reads it)."""
    out, vision, unknown = {}, {}, []
    for key, tensor in state.items():
        if key.startswith("llama."):
            if not key.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved
                out["llm.model." + key.removeprefix("llama.")] = tensor
        elif key == "lm_head.weight":
            out["llm.lm_head.weight"] = tensor
        elif key.startswith("vision_tower."):
            vision[key.removeprefix("vision_tower.")] = tensor
        elif key in PROJECTOR_KEYS:
            out["bridger." + PROJECTOR_KEYS[key]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise PublishedModelError(f"{src}: unexpected weights {sorted(unknown)[:4]}")
    proj = vision.pop("proj", None)
    want = (cfg.vision.hidden_size, embed_dim)
    if proj is None or tuple(proj.shape) != want:
        got = None if proj is None else tuple(proj.shape)
        raise PublishedModelError(f"{src}: vision_tower.proj is {got}, expected {want}")
    try:
        ours = vit_keys.open_clip_to_clip(vision)
    except KeyError as e:
        raise PublishedModelError(f"{src}: no vision_tower.{e.args[0]}") from None
    except ValueError as e:
        raise PublishedModelError(f"{src}: vision_tower: {e}") from None
    out.update({f"vision.{k}": v for k, v in ours.items()})
    return out


def _tokenizer(src: Path, cfg: ModelConfig) -> Any:
    """The slow LlamaTokenizer CXR-LLaVA loads, as transformers 5's LlamaTokenizer with the same
    `legacy` rule, and the chat template of its conversation."""
    from transformers import LlamaTokenizer

    from cxrlite.model.tokenizer import TokenizerError, with_template

    path = src / "tokenizer_config.json"
    spec = read_json(path)
    # with add_bos_token off, tokenizer_image_token would drop the first token after the image
    expect(path, "add_bos_token", spec.get("add_bos_token", True), [True])
    expect(path, "add_eos_token", spec.get("add_eos_token", False), [False])
    # its own template would replace the default Llama-2 one that chat_template() reproduces
    expect(path, "chat_template", spec.get("chat_template"), [None])
    expect(path, "legacy", spec.get("legacy"), [None, True, False])
    legacy = spec.get("legacy") is not False  # transformers 4.36: absent means legacy
    try:
        tokenizer = LlamaTokenizer.from_pretrained(str(src), local_files_only=True, legacy=legacy)
    except (OSError, ValueError, TypeError) as e:
        raise PublishedModelError(f"{src}: cannot load the tokenizer ({e})") from None
    # saved into the bundle's tokenizer_config.json: transformers 5 rebuilds the pre-tokenizer
    # from it on load (legacy: a "▁" before the text after a special token too), and its own
    # default is not legacy
    tokenizer.init_kwargs["legacy"] = legacy
    if tokenizer.bos_token_id != cfg.llm.bos_token_id or len(tokenizer) > cfg.llm.vocab_size:
        raise PublishedModelError(
            f"{src}: the tokenizer (BOS {tokenizer.bos_token_id}, {len(tokenizer)} tokens) does "
            f"not fit the LLM (BOS {cfg.llm.bos_token_id}, {cfg.llm.vocab_size} tokens)"
        )
    tokenizer.pad_token = tokenizer.unk_token  # as CXRLLAVAModel.__init__ sets it
    tokenizer.chat_template = chat_template(SYSTEM_PROMPT)
    try:
        return with_template(tokenizer, cfg)
    except TokenizerError as e:
        raise PublishedModelError(f"{src}: {e}") from None


def import_cxr_llava(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    accept_license: bool = False,
    checkpoint_out: str | os.PathLike | None = None,
    revision: str | None = None,
    overwrite: bool = False,
) -> Bundle:
    """Convert CXR-LLaVA v2 (`src`) into a bundle at `out`, and the cxrlite checkpoint it is
    exported from at `checkpoint_out` (default: `<out>-checkpoint`)."""
    src, out = Path(src), Path(out)
    require_license(NAME, LICENSE, accept_license)
    require_files(src, FILES, f"{NAME} folder")
    cfg, embed_dim = _model_config(src, read_json(src / "config.json"))
    tokenizer = _tokenizer(src, cfg)
    state = _convert(load_safetensors_folder(src, f"{NAME} folder"), cfg, embed_dim, src)
    check_shapes(state, expected_shapes(cfg), src)
    record = provenance(NAME, LICENSE, revision, {"model": (src, folder_hashes(src))})
    record["task"] = "radiologic report of a chest radiograph (write_radiologic_report)"
    return write_bundle(
        state, tokenizer, cfg, out=out,
        checkpoint_out=checkpoint_out,
        record=record, overwrite=overwrite,
    )  # fmt: skip
