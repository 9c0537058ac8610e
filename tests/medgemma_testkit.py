"""A random-weight MedGemma 4B-it folder in its published layout, at tiny widths.

google/medgemma-4b-it holds: config.json (Gemma3ForConditionalGeneration: text_config, a SigLIP
vision_config, mm_tokens_per_image, image_token_index, boi/eoi_token_index, eos [<eos>,
<end_of_turn>]), model-0000N-of-0000M.safetensors + model.safetensors.index.json with the
transformers 4.50 names (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`; the output head tied to the embeddings), tokenizer.model /
tokenizer.json / tokenizer_config.json (Gemma's SentencePiece: pad 0, eos 1, bos 2, unk 3, the
turn and image markers, <image_soft_token> added after the pieces), chat_template.json (Gemma 3's
template), preprocessor_config.json (Gemma3ImageProcessor) and processor_config.json. Nothing
here imports cxrlite: the folder is written from the published layout alone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from published_testkit import _sentences

# Gemma 3's chat template as published (chat_template.json of google/gemma-3-4b-it, which
# MedGemma 4B-it reuses): a system message becomes a prefix of the first user turn, text is
# trimmed, an image part is the "<start_of_image>" marker the processor then expands.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    '    {%- set first_user_prefix = "" -%}\n'
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    '        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}\n'
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    '        {%- set role = "model" -%}\n'
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    '        {{ raise_exception("Invalid content type") }}\n'
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)
MARKERS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>"]
TEXT = {"hidden": 64, "layers": 6, "heads": 4, "kv_heads": 2, "head_dim": 32, "intermediate": 128,
        "sliding_window": 8}  # fmt: skip
VISION = {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64, "image": 64, "patch": 8}
TOKENS_PER_IMAGE = 16  # an 8 x 8 patch grid pooled to 4 x 4


def write_gemma_tokenizer(folder: Path) -> dict[str, int]:
    """Gemma's tokenizer files at a tiny vocabulary; returns the ids of its special tokens."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()), model_prefix=str(folder / "tokenizer"),
        model_type="bpe", vocab_size=400, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=[*MARKERS, "\n", "\n\n", "\n\n\n"], byte_fallback=True,
        split_digits=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "padding_side": "left", "model_max_length": 1000000000,
        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"},
    }  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))  # tokenizer.json with the added image token
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    names = {"bos": "<bos>", "eos": "<eos>", "end_of_turn": "<end_of_turn>",
             "boi": "<start_of_image>", "eoi": "<end_of_image>", "image": "<image_soft_token>"}  # fmt: skip
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in names.items()}
    ids["vocab"] = len(tokenizer)
    return ids


def medgemma_config(ids: dict[str, int]) -> dict:
    """config.json as google/medgemma-4b-it writes it, at tiny widths."""
    return {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": ids["boi"], "eoi_token_index": ids["eoi"],
        "eos_token_id": [ids["eos"], ids["end_of_turn"]], "image_token_index": ids["image"],
        "initializer_range": 0.02, "mm_tokens_per_image": TOKENS_PER_IMAGE, "model_type": "gemma3",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
            "final_logit_softcapping": None, "head_dim": TEXT["head_dim"],
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": TEXT["hidden"],
            "intermediate_size": TEXT["intermediate"], "max_position_embeddings": 512,
            "model_type": "gemma3_text", "num_attention_heads": TEXT["heads"],
            "num_hidden_layers": TEXT["layers"], "num_key_value_heads": TEXT["kv_heads"],
            "query_pre_attn_scalar": TEXT["head_dim"], "rms_norm_eps": 1e-06,
            "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "rope_theta": 1000000.0, "sliding_window": TEXT["sliding_window"],
            "sliding_window_pattern": 6, "vocab_size": ids["vocab"],
        },
        "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
        "vision_config": {
            "hidden_act": "gelu_pytorch_tanh", "hidden_size": VISION["hidden"],
            "image_size": VISION["image"], "intermediate_size": VISION["intermediate"],
            "layer_norm_eps": 1e-06, "model_type": "siglip_vision_model",
            "num_attention_heads": VISION["heads"], "num_hidden_layers": VISION["layers"],
            "num_channels": 3, "patch_size": VISION["patch"], "vision_use_head": False,
        },
    }  # fmt: skip


def _published_name(name: str) -> str:
    """transformers 5's Gemma3ForConditionalGeneration names -> the 4.50 names MedGemma ships."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(new):
            return old + name.removeprefix(new)
    raise KeyError(name)


def write_medgemma(folder: Path, seed: int = 0) -> Path:
    """google/medgemma-4b-it's layout with random weights (two shards and their index)."""
    from safetensors.torch import save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    ids = write_gemma_tokenizer(folder)
    config = medgemma_config(ids)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    drop = ("architectures", "torch_dtype", "transformers_version")
    model = Gemma3ForConditionalGeneration(
        Gemma3Config(**{k: v for k, v in config.items() if k not in drop})
    )
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embeddings: not in the published files
        # norms are (1 + w) with w = 0 at init: perturb everything to a trained model's scale
        state[_published_name(name)] = (tensor + torch.randn_like(tensor) * 0.05).to(torch.bfloat16)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2 :]}  # fmt: skip
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(folder / shard), {"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in state.values())},
             "weight_map": {k: s for s, keys in shards.items() for k in keys}}  # fmt: skip
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    preprocessor = {
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None,
        "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": TOKENS_PER_IMAGE,
        "image_std": [0.5, 0.5, 0.5], "processor_class": "Gemma3Processor", "resample": 2,
        "rescale_factor": 1 / 255, "size": {"height": VISION["image"], "width": VISION["image"]},
    }  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    processor = {"image_seq_length": TOKENS_PER_IMAGE, "processor_class": "Gemma3Processor"}
    (folder / "processor_config.json").write_text(json.dumps(processor, indent=2))
    generation = {"bos_token_id": ids["bos"], "eos_token_id": [ids["eos"], ids["end_of_turn"]],
                  "pad_token_id": 0, "do_sample": True, "top_k": 64, "top_p": 0.95}  # fmt: skip
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return folder
