"""Random-weight checkpoints written in the published layouts of the models `cxrlite import`
reads: the exact file names, key names, config fields and pickles, at tiny widths (the real
geometry where a test needs it). Nothing here imports cxrlite's importers: the fixtures are
written from the published layouts alone, so a key-mapping error cannot cancel out.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = (
    "the heart size is normal no focal consolidation pleural effusion or pneumothorax lungs are "
    "clear mild cardiomegaly small left right lower lobe opacity provide a description of "
    "findings in radiology image chat between curious user and an artificial intelligence "
    "assistant gives helpful detailed polite answers to questions USER ASSISTANT"
).split()
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)
LLM = {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 128}
VISION = {"hidden": 128, "layers": 2, "patch": 14}


def _sentences(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))) for _ in range(n)]


def write_llama_tokenizer(folder: Path, vocab_size: int = 320) -> int:
    """A SentencePiece model with Llama's settings (unk 0, bos 1, eos 2, byte fallback, dummy
    prefix) and Vicuna's tokenizer files; returns its vocabulary size."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()), model_prefix=str(folder / "tokenizer"),
        model_type="bpe", vocab_size=vocab_size, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.vocab").unlink()
    token = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    config = {
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>", **token},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", "content": "</s>", **token},
        "legacy": False, "model_max_length": 4096, "pad_token": None, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", "content": "<unk>", **token},
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {
        k: {"content": c, **token}
        for k, c in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))
    }
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**special, "pad_token": "<unk>"}, indent=2)
    )
    return vocab_size


def write_vicuna(folder: Path, seed: int = 0) -> Path:
    """lmsys/vicuna-7b-v1.5's layout: config.json, two pickled shards with their index (rotary
    inv_freq buffers included, as transformers 4.31 saved them), the tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = write_llama_tokenizer(folder)
    config = {
        "_name_or_path": "vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": LLM["hidden"],
        "initializer_range": 0.02, "intermediate_size": LLM["intermediate"],
        "max_position_embeddings": 2048, "model_type": "llama",
        "num_attention_heads": LLM["heads"], "num_hidden_layers": LLM["layers"],
        "num_key_value_heads": LLM["heads"], "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float16", "transformers_version": "4.31.0", "vocab_size": vocab,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.9,
                  "max_length": 4096, "top_p": 0.6, "transformers_version": "4.31.0"}  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    torch.manual_seed(seed)
    hf = LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    state = {k: v.to(torch.float16) for k, v in LlamaForCausalLM(hf).state_dict().items()}
    head_dim = LLM["hidden"] // LLM["heads"]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    for i in range(LLM["layers"]):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    names = sorted(state)
    half = len(names) // 2
    shards = {
        "pytorch_model-00001-of-00002.bin": names[:half],
        "pytorch_model-00002-of-00002.bin": names[half:],
    }
    for shard, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / shard)
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
             "weight_map": {k: s for s, keys in shards.items() for k in keys}}  # fmt: skip
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def timm_trunk(image_size: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A timm vit_*_patch14_dinov2 trunk's state dict (no prefix): fused qkv, LayerScale."""
    g = torch.Generator().manual_seed(seed)
    d, p = VISION["hidden"], VISION["patch"]
    n = (image_size // p) ** 2

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "cls_token": rnd(1, 1, d), "pos_embed": rnd(1, n + 1, d),
        "patch_embed.proj.weight": rnd(d, 3, p, p), "patch_embed.proj.bias": rnd(d),
        "norm.weight": 1 + rnd(d), "norm.bias": rnd(d),
    }  # fmt: skip
    for i in range(VISION["layers"]):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + rnd(d), b + "norm1.bias": rnd(d),
            b + "attn.qkv.weight": rnd(3 * d, d), b + "attn.qkv.bias": rnd(3 * d),
            b + "attn.proj.weight": rnd(d, d), b + "attn.proj.bias": rnd(d),
            b + "ls1.gamma": 0.5 + rnd(d), b + "norm2.weight": 1 + rnd(d), b + "norm2.bias": rnd(d),
            b + "mlp.fc1.weight": rnd(4 * d, d), b + "mlp.fc1.bias": rnd(4 * d),
            b + "mlp.fc2.weight": rnd(d, 4 * d), b + "mlp.fc2.bias": rnd(d), b + "ls2.gamma": 0.5 + rnd(d),
        })  # fmt: skip
    return state


def write_llava_rad(folder: Path, vocab: int, image_size: int = 518, seed: int = 2) -> Path:
    """microsoft/llava-rad's layout: LLaVA config.json, PEFT LoRA (adapter_config.json +
    adapter_model.bin), the projector in non_lora_trainables.bin, the open_clip tower."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    h, d = LLM["hidden"], VISION["hidden"]
    config = {
        "_name_or_path": "vicuna-7b-v1.5", "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
        "hidden_size": h, "image_aspect_ratio": "square", "image_grid_pinpoints": None,
        "initializer_range": 0.02, "intermediate_size": LLM["intermediate"],
        "max_position_embeddings": 2048, "mm_hidden_size": d, "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
        "mm_vision_tower": "biomedclip_cxr_518",
        "mm_vision_tower_checkpoint": "biomedclipcxr_518_checkpoint.pt",
        "mm_vision_tower_config": "llava/model/multimodal_encoder/open_clip_encoder/model_configs/biomedclip_cxr_518.json",
        "model_type": "llava", "num_attention_heads": LLM["heads"],
        "num_hidden_layers": LLM["layers"], "num_key_value_heads": LLM["heads"], "pad_token_id": 0,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False, "use_cache": True, "use_mm_proj": True, "vocab_size": vocab,
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter_config = {
        "auto_mapping": None, "base_model_name_or_path": "lmsys/vicuna-7b-v1.5", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": 16,
        "lora_dropout": 0.05, "modules_to_save": None, "peft_type": "LORA", "r": 8,
        "revision": None, "target_modules": targets, "task_type": "CAUSAL_LM",
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(
        json.dumps(adapter_config, indent=2, sort_keys=True)
    )
    shapes = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
              "gate_proj": (LLM["intermediate"], h), "up_proj": (LLM["intermediate"], h),
              "down_proj": (h, LLM["intermediate"])}  # fmt: skip
    adapter = {}
    for i in range(LLM["layers"]):
        for name, (out_f, in_f) in shapes.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{name}"
            adapter[f"{key}.lora_A.weight"] = (torch.randn(8, in_f, generator=g) * 0.1).bfloat16()
            adapter[f"{key}.lora_B.weight"] = (torch.randn(out_f, 8, generator=g) * 0.1).bfloat16()
    torch.save(adapter, folder / "adapter_model.bin")
    projector = {
        "base_model.model.model.mm_projector.0.weight": torch.randn(h, d, generator=g) * 0.05,
        "base_model.model.model.mm_projector.0.bias": torch.randn(h, generator=g) * 0.05,
        "base_model.model.model.mm_projector.2.weight": torch.randn(h, h, generator=g) * 0.05,
        "base_model.model.model.mm_projector.2.bias": torch.randn(h, generator=g) * 0.05,
    }
    torch.save({k: v.bfloat16() for k, v in projector.items()}, folder / "non_lora_trainables.bin")
    vision_json = {
        "embed_dim": 512,
        "vision_cfg": {"timm_model_name": "vit_base_patch14_dinov2.lvd142m",
                       "timm_model_pretrained": False, "timm_pool": "", "timm_proj": "linear",
                       "image_size": image_size},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                     "context_length": 256},
    }  # fmt: skip
    (folder / "biomedclipcxr_518.json").write_text(json.dumps(vision_json, indent=4))
    trunk = timm_trunk(image_size)
    state = {f"module.visual.trunk.{k}": v for k, v in trunk.items()}
    state["module.visual.head.proj.weight"] = torch.randn(512, d, generator=g)
    state["module.text.transformer.embeddings.word_embeddings.weight"] = torch.randn(
        30, 8, generator=g
    )
    state["module.logit_scale"] = torch.tensor(4.6052)
    torch.save({"state_dict": state, "epoch": 20, "name": "biomedclip_cxr_518"},
               folder / "biomedclipcxr_518_checkpoint.pt")  # fmt: skip
    return folder


def timm_reference(trunk: dict[str, torch.Tensor], projector: dict, pixels: torch.Tensor,
                   select: int = -2) -> torch.Tensor:  # fmt: skip
    """LLaVA-Rad's image features by hand from the published weights: timm's DINOv2 forward
    (fused qkv attention, LayerScale, exact GELU), hidden state `select` (final norm not
    applied), CLS dropped, then the mm_projector (Linear, GELU, Linear)."""
    import torch.nn.functional as F

    d, p = VISION["hidden"], VISION["patch"]
    heads = d // 64
    x = F.conv2d(pixels, trunk["patch_embed.proj.weight"], trunk["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([trunk["cls_token"].expand(len(x), -1, -1), x], 1) + trunk["pos_embed"]
    states = [x]
    for i in range(VISION["layers"]):
        b = lambda name, i=i: trunk[f"blocks.{i}.{name}"]  # noqa: E731
        y = F.layer_norm(x, (d,), b("norm1.weight"), b("norm1.bias"), eps=1e-6)
        q, k, v = F.linear(y, b("attn.qkv.weight"), b("attn.qkv.bias")).chunk(3, -1)
        split = lambda t: t.unflatten(-1, (heads, d // heads)).transpose(1, 2)  # noqa: E731
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5, -1)
        y = (att @ split(v)).transpose(1, 2).flatten(2)
        x = x + b("ls1.gamma") * F.linear(y, b("attn.proj.weight"), b("attn.proj.bias"))
        y = F.layer_norm(x, (d,), b("norm2.weight"), b("norm2.bias"), eps=1e-6)
        y = F.linear(
            F.gelu(F.linear(y, b("mlp.fc1.weight"), b("mlp.fc1.bias"))),
            b("mlp.fc2.weight"),
            b("mlp.fc2.bias"),
        )
        x = x + b("ls2.gamma") * y
        states.append(x)
    features = states[select][:, 1:]
    w = {k.split("mm_projector.")[1]: v.float() for k, v in projector.items()}
    return F.linear(
        F.gelu(F.linear(features, w["0.weight"], w["0.bias"])), w["2.weight"], w["2.bias"]
    )


# --- MAIRA-2 ---------------------------------------------------------------------------------

MAIRA2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}You are an expert radiology assistant tasked "
    "with interpreting a chest X-ray study.  {% endif %}{% if message['role'] == 'user' %}USER:  "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}<image>{% endif %}{% endfor %}  "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: {% for item in message['content'] %}"
    "{{ item['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}"
)
MAIRA2_ADDED = (
    ["<obj>", "</obj>"] + [f"<{a}{i}>" for i in range(100) for a in "xy"]
    + ["<box>", "</box>", "<image>", "<prev_im>", "<lat_image>"]
)  # fmt: skip
MAIRA2_MEAN, MAIRA2_STD = 0.5307, 0.2583


def write_maira2(folder: Path, image_size: int = 518, seed: int = 3) -> Path:
    """microsoft/maira-2's layout: config.json (maira2, nested text/vision configs), two
    safetensors shards with their index (transformers 4 names), the tokenizer with its 207 added
    tokens, chat_template.json, preprocessor_config.json and processor_config.json."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    base_vocab = write_llama_tokenizer(folder)  # Vicuna's SentencePiece model and files
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tokenizer.add_tokens(MAIRA2_ADDED)
    tokenizer.pad_token = "<unk>"
    tokenizer.save_pretrained(folder)  # + tokenizer.json with the added tokens
    vocab = base_vocab + len(MAIRA2_ADDED)
    image_id = base_vocab + MAIRA2_ADDED.index("<image>")
    (folder / "chat_template.json").write_text(
        json.dumps({"chat_template": MAIRA2_CHAT_TEMPLATE}, indent=2)
    )
    d, layers = VISION["hidden"], VISION["layers"]
    text_config = {
        "model_type": "llama", "vocab_size": vocab, "hidden_size": LLM["hidden"],
        "intermediate_size": LLM["intermediate"], "num_hidden_layers": LLM["layers"],
        "num_attention_heads": LLM["heads"], "num_key_value_heads": LLM["heads"],
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 1.5, "type": "linear"}, "torch_dtype": "float32",
    }  # fmt: skip
    vision_config = {
        "model_type": "dinov2", "hidden_size": d, "num_hidden_layers": layers,
        "num_attention_heads": d // 64, "patch_size": VISION["patch"], "image_size": image_size,
        "mlp_ratio": 4, "layerscale_value": 1.0, "apply_layernorm": True,
        "reshape_hidden_states": False, "out_features": [f"stage{layers}"],
        "out_indices": [layers], "stage_names": ["stem"] + [f"stage{i}" for i in range(1, layers + 1)],
        "layer_norm_eps": 1e-06, "use_swiglu_ffn": False, "qkv_bias": True,
    }  # fmt: skip
    config = {
        "architectures": ["Maira2ForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_maira2.Maira2Config",
                     "AutoModelForCausalLM": "modeling_maira2.Maira2ForConditionalGeneration",
                     "AutoModelForVision2Seq": "modeling_maira2.Maira2ForConditionalGeneration"},
        "hidden_size": LLM["hidden"], "ignore_index": -100, "image_seq_length": 576,
        "image_token_index": image_id, "model_type": "maira2", "multimodal_projector_bias": True,
        "pad_token_id": 0, "projector_hidden_act": "gelu", "projector_n_layers": 4,
        "text_config": text_config, "torch_dtype": "float32", "transformers_version": "4.46.0",
        "vision_config": vision_config, "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    preprocessor = {
        "auto_map": {"AutoProcessor": "processing_maira2.Maira2Processor"},
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [MAIRA2_MEAN] * 3, "image_processor_type": "BitImageProcessor",
        "image_std": [MAIRA2_STD] * 3, "processor_class": "Maira2Processor", "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": image_size},
    }  # fmt: skip
    (folder / "preprocessor_config.json").write_text(
        json.dumps(preprocessor, indent=2, sort_keys=True)
    )
    processor = {"box_end_token": "</box>", "box_start_token": "<box>", "image_token": "<image>",
                 "num_additional_image_tokens": 1, "num_box_coord_bins": 100, "patch_size": 14,
                 "phrase_end_token": "</obj>", "phrase_start_token": "<obj>",
                 "processor_class": "Maira2Processor"}  # fmt: skip
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2, sort_keys=True))
    torch.manual_seed(seed)
    hf = LlamaConfig(**{k: v for k, v in text_config.items() if k != "model_type"})
    state = {f"language_model.{k}": v for k, v in LlamaForCausalLM(hf).state_dict().items()}
    for k, v in maira2_vision_weights(image_size, seed).items():
        state[f"vision_tower.{k}"] = v
    g = torch.Generator().manual_seed(seed)
    for n, width_in in enumerate([d, LLM["hidden"], LLM["hidden"], LLM["hidden"]]):
        state[f"multi_modal_projector.layers.{2 * n}.weight"] = (
            torch.randn(LLM["hidden"], width_in, generator=g) * 0.05
        )
        state[f"multi_modal_projector.layers.{2 * n}.bias"] = (
            torch.randn(LLM["hidden"], generator=g) * 0.05
        )
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for shard, keys in shards.items():
        save_file(
            {k: state[k].contiguous() for k in keys}, str(folder / shard), metadata={"format": "pt"}
        )
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in state.values())},
             "weight_map": {k: s for s, keys in shards.items() for k in keys}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
    return folder


def maira2_vision_weights(image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """RAD-DINO's weights with transformers 4's Dinov2 names (attention.attention.query ...)."""
    g = torch.Generator().manual_seed(seed + 100)
    d, p = VISION["hidden"], VISION["patch"]
    n = (image_size // p) ** 2

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "embeddings.cls_token": rnd(1, 1, d), "embeddings.mask_token": rnd(1, d),
        "embeddings.position_embeddings": rnd(1, n + 1, d),
        "embeddings.patch_embeddings.projection.weight": rnd(d, 3, p, p),
        "embeddings.patch_embeddings.projection.bias": rnd(d),
        "layernorm.weight": 1 + rnd(d), "layernorm.bias": rnd(d),
    }  # fmt: skip
    for i in range(VISION["layers"]):
        b = f"encoder.layer.{i}."
        for name in ("attention.attention.query", "attention.attention.key",
                     "attention.attention.value", "attention.output.dense"):  # fmt: skip
            state[b + name + ".weight"], state[b + name + ".bias"] = rnd(d, d), rnd(d)
        state.update({
            b + "norm1.weight": 1 + rnd(d), b + "norm1.bias": rnd(d),
            b + "layer_scale1.lambda1": 0.5 + rnd(d), b + "norm2.weight": 1 + rnd(d),
            b + "norm2.bias": rnd(d), b + "mlp.fc1.weight": rnd(4 * d, d), b + "mlp.fc1.bias": rnd(4 * d),
            b + "mlp.fc2.weight": rnd(d, 4 * d), b + "mlp.fc2.bias": rnd(d),
            b + "layer_scale2.lambda1": 0.5 + rnd(d),
        })  # fmt: skip
    return state


# --- CXR-LLaVA -------------------------------------------------------------------------------

# open_clip ViT at tiny widths; head_width 32 (not open_clip's default 64) so the head count is
# read from the config, not assumed
CXR_LLAVA_VISION = {"width": 64, "layers": 2, "head_width": 32, "patch": 16, "embed_dim": 48}
# image_preprocess_cfg's mean and std as a run of the published model recorded them
CXR_LLAVA_MEAN, CXR_LLAVA_STD = 0.5518136078431373, 0.3821719215686275
# what transformers 4.36's LlamaConfig.to_dict() adds beside the architecture (CXRLLAVAConfig
# keeps the `llama` dict as given)
_LLAMA_DUMP_NOISE = {
    "_name_or_path": "meta-llama/Llama-2-7b-chat-hf", "architectures": ["LlamaForCausalLM"],
    "add_cross_attention": False, "chunk_size_feed_forward": 0, "do_sample": False,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False,
    "is_encoder_decoder": False, "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "max_length": 20,
    "model_type": "llama", "output_hidden_states": False, "pretraining_tp": 1,
    "return_dict": True, "temperature": 1.0, "top_p": 1.0, "torch_dtype": "bfloat16",
    "torchscript": False, "transformers_version": "4.36.2", "use_cache": True,
}  # fmt: skip


def open_clip_tower(image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """open_clip's VisionTransformer state dict (no prefix), 1-channel conv1 without bias,
    nn.MultiheadAttention's fused in_proj, `proj` (width x embed_dim)."""
    g = torch.Generator().manual_seed(seed)
    v = CXR_LLAVA_VISION
    d, p = v["width"], v["patch"]
    n = (image_size // p) ** 2

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {
        "conv1.weight": rnd(d, 1, p, p), "class_embedding": rnd(d),
        "positional_embedding": rnd(n + 1, d), "ln_pre.weight": 1 + rnd(d),
        "ln_pre.bias": rnd(d), "ln_post.weight": 1 + rnd(d), "ln_post.bias": rnd(d),
        "proj": rnd(d, v["embed_dim"]),
    }  # fmt: skip
    for i in range(v["layers"]):
        b = f"transformer.resblocks.{i}."
        state.update({
            b + "ln_1.weight": 1 + rnd(d), b + "ln_1.bias": rnd(d),
            b + "attn.in_proj_weight": rnd(3 * d, d, scale=0.2), b + "attn.in_proj_bias": rnd(3 * d),
            b + "attn.out_proj.weight": rnd(d, d, scale=0.2), b + "attn.out_proj.bias": rnd(d),
            b + "ln_2.weight": 1 + rnd(d), b + "ln_2.bias": rnd(d),
            b + "mlp.c_fc.weight": rnd(4 * d, d, scale=0.2), b + "mlp.c_fc.bias": rnd(4 * d),
            b + "mlp.c_proj.weight": rnd(d, 4 * d, scale=0.2), b + "mlp.c_proj.bias": rnd(d),
        })  # fmt: skip
    return state


def write_cxr_llava(
    folder: Path, image_size: int = 512, seed: int = 4, legacy: bool | None = False
) -> Path:
    """ECOFRI/CXR-LLAVA-v2's layout: config.json (model_type "CXR-LLAVA": clip_vision_cfg,
    clip_embed_dim, image_preprocess_cfg, mm_projector_dim, the llama dict), bf16 safetensors
    shards with their index (`vision_tower.*`, `mm_projector.*`, `llama.*`, `lm_head.weight`),
    Llama-2's tokenizer files without a chat template (`legacy` None: no such field), the
    generation config and the remote code, which must never run."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_llama_tokenizer(folder)
    if legacy is None:
        spec = json.loads((folder / "tokenizer_config.json").read_text())
        del spec["legacy"]
        (folder / "tokenizer_config.json").write_text(json.dumps(spec, indent=2) + "\n")
    v = CXR_LLAVA_VISION
    llama = {
        "vocab_size": vocab, "hidden_size": LLM["hidden"], "intermediate_size": LLM["intermediate"],
        "num_hidden_layers": LLM["layers"], "num_attention_heads": LLM["heads"],
        "num_key_value_heads": LLM["heads"], "hidden_act": "silu", "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
        "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "pad_token_id": None,
    }  # fmt: skip
    config = {
        "_name_or_path": "ECOFRI/CXR-LLAVA-v2", "architectures": ["CXRLLAVAModel"],
        "auto_map": {"AutoConfig": "CXR_LLAVA_HF.CXRLLAVAConfig",
                     "AutoModel": "CXR_LLAVA_HF.CXRLLAVAModel"},
        "model_type": "CXR-LLAVA", "clip_embed_dim": v["embed_dim"],
        "clip_vision_cfg": {"image_size": image_size, "layers": v["layers"], "width": v["width"],
                            "head_width": v["head_width"], "patch_size": v["patch"],
                            "mlp_ratio": 4.0, "output_tokens": True},
        "clip_vision_tower_dtype": "bf16", "mm_projector_dim": v["width"],
        "image_preprocess_cfg": {"mean": CXR_LLAVA_MEAN, "std": CXR_LLAVA_STD},
        "llama": {**_LLAMA_DUMP_NOISE, **llama}, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.2",
    }  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "temperature": 0.6,
                  "top_p": 0.9, "max_length": 4096, "transformers_version": "4.36.2"}  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name in ("CXR_LLAVA_HF.py", "VisualTransformer.py"):
        (folder / name).write_text(
            "from pathlib import Path\nPath(__file__).with_name('remote-code-ran').touch()\n"
        )
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**llama))
    state = {
        ("lm_head.weight" if k == "lm_head.weight" else "llama." + k.removeprefix("model.")): t
        for k, t in hf.state_dict().items()
    }
    state.update({f"vision_tower.{k}": t for k, t in open_clip_tower(image_size, seed).items()})
    g = torch.Generator().manual_seed(seed + 1)
    state["mm_projector.weight"] = torch.randn(LLM["hidden"], v["width"], generator=g) * 0.05
    state["mm_projector.bias"] = torch.randn(LLM["hidden"], generator=g) * 0.05
    state = {k: t.to(torch.bfloat16).contiguous() for k, t in state.items()}  # cast as published
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in state.values())},
             "weight_map": {k: s for s, keys in shards.items() for k in keys}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True) + "\n"
    )
    return folder
