"""The LLM of a cxrlite checkpoint as a GGUF file that llama.cpp runs (architecture "llama", or
"gemma3" for Gemma 3: `LLM_FAMILIES`).

Weights are streamed tensor by tensor from model.safetensors (a 7B LLM never sits in memory
whole): GGUFWriter gets every tensor's shape first, then the data one tensor at a time. Names
follow gguf's own table for the architecture (`get_tensor_name_map`); what else differs per
family follows llama.cpp's convert_hf_to_gguf: Llama's q_proj/k_proj get the rotary permutation
llama.cpp expects, Gemma's norm weights are stored plus one (its RMSNorm scales by 1 + w), and
Gemma 3 carries its sliding window, head size and local rope base. 1-D tensors stay f32 whatever
the dtype, and a tied lm_head is left out: llama.cpp then reuses token_embd.

Tokenizers: a SentencePiece `tokenizer.model` (ours, or a Llama-2-style pretrained one, plus
added tokens beyond its pieces) -> `tokenizer.ggml.model = "llama"`; a byte-level BPE
`tokenizer.json` (Llama-3 style) -> "gpt2" with merges. Runtimes should feed our token ids; the
tokenizer metadata is there so llama.cpp tools can load, print and detokenize the model.

`gguf_parity` checks the file against transformers on the same ids and on the same
embeddings (text + image), which is the path the runtime uses for images.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlite.errors import CxrliteError
from cxrlite.fileio import atomic_path
from cxrlite.model.checkpoint import WEIGHTS_FILE, CheckpointError, load_config
from cxrlite.model.config import GEMMA3_GLOBAL_EVERY, LLM_FAMILIES, LLMConfig
from cxrlite.model.tokenizer import SPM_FILE, load_tokenizer

logger = logging.getLogger(__name__)

GGUF_DTYPES = ("f32", "f16")
LLM_PREFIX = "llm."
# Llama-3's pre-tokenizer regex, which llama.cpp knows as "llama-bpe".
_LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


class GGUFExportError(CxrliteError, ValueError):
    """The checkpoint cannot be written as GGUF; the message names the file and the problem."""


@dataclass
class GGUFVocab:
    """Tokenizer metadata for llama.cpp: one entry per embedding row."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None = None
    merges: list[str] | None = None
    pre: str | None = None
    special_ids: dict[str, int | None] = field(default_factory=dict)  # bos/eos/unk/pad
    add_bos: bool = True
    add_eos: bool = False
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    chat_template: str | None = None


# --- tokenizer -------------------------------------------------------------------------------


def _pad_vocab(vocab: GGUFVocab, vocab_size: int, source: Path) -> GGUFVocab:
    """Rows past the tokenizer (an embedding grown for alignment) get unused [PAD{i}] tokens, as
    convert_hf_to_gguf writes them; a tokenizer larger than the embedding cannot be exported."""
    import gguf

    if len(vocab.tokens) > vocab_size:
        raise GGUFExportError(
            f"{source}: the tokenizer has {len(vocab.tokens)} tokens but the LLM embeds only "
            f"{vocab_size}"
        )
    for i in range(len(vocab.tokens), vocab_size):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.token_types.append(int(gguf.TokenType.UNUSED))
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    return vocab


def _added_tokens(tokenizer_dir: Path) -> list[dict[str, Any]]:
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GGUFExportError(f"{path}: unreadable ({e})") from None
    return list(data.get("added_tokens") or [])


def _sentencepiece_vocab(tokenizer_dir: Path) -> GGUFVocab:
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    path = tokenizer_dir / SPM_FILE
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError has no stable import path
        raise GGUFExportError(f"{path}: not a SentencePiece model ({e})") from None
    # SentencePiece piece types are numbered as gguf.TokenType (1 normal .. 6 byte), so the
    # user-defined <image> stays user-defined.
    tokens = [p.piece for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    # Tokens added after training (a pretrained Llama-2 + <image>) live only in tokenizer.json.
    for added in sorted(_added_tokens(tokenizer_dir), key=lambda t: t["id"]):
        token_id = int(added["id"])
        if token_id < len(tokens):
            continue
        if token_id != len(tokens):
            raise GGUFExportError(
                f"{tokenizer_dir}: added token {added['content']!r} has id {token_id}; "
                f"expected the next id {len(tokens)}"
            )
        tokens.append(added["content"])
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        types.append(int(kind))
        scores.append(-1000.0)
    return GGUFVocab(
        model="llama",
        tokens=tokens,
        token_types=types,
        scores=scores,
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
        remove_extra_whitespaces=bool(proto.normalizer_spec.remove_extra_whitespaces),
    )


def _split_patterns(node: Any) -> list[str]:
    """The regexes of every Split step in a tokenizer.json pre_tokenizer tree."""
    if isinstance(node, list):
        return [p for child in node for p in _split_patterns(child)]
    if not isinstance(node, dict):
        return []
    found = [node["pattern"]["Regex"]] if isinstance(node.get("pattern"), dict) else []
    found = [p for p in found if isinstance(p, str)]
    return found + [
        p for key, child in node.items() if key != "pattern" for p in _split_patterns(child)
    ]


def _byte_level_bpe_vocab(tokenizer_dir: Path) -> GGUFVocab:
    import gguf

    path = tokenizer_dir / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise GGUFExportError(
            f"{tokenizer_dir}: unsupported tokenizer (model {model.get('type')!r}, decoder "
            f"{decoder.get('type')!r}). GGUF export supports a SentencePiece {SPM_FILE} "
            "(Llama-2 style, and cxrlite's own) or a byte-level BPE tokenizer.json (Llama-3 style)"
        )
    by_id = {int(i): t for t, i in model["vocab"].items()}
    added = {int(t["id"]): t for t in _added_tokens(tokenizer_dir)}
    by_id.update({i: t["content"] for i, t in added.items()})
    n = max(by_id) + 1
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n)]
    types = []
    for i in range(n):
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            special = added[i].get("special")
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    # llama.cpp picks its pre-tokenizer by name; Llama-3's split regex is "llama-bpe".
    llama3 = any(_LLAMA3_SPLIT in p for p in _split_patterns(data.get("pre_tokenizer")))
    pre = "llama-bpe" if llama3 else "default"
    if pre == "default":
        logger.warning(
            "%s: unknown BPE pre-tokenizer; llama.cpp's own tokenization of text may differ "
            "(feeding token ids is unaffected)",
            tokenizer_dir,
        )
    return GGUFVocab(
        model="gpt2", tokens=tokens, token_types=[int(t) for t in types], merges=merges, pre=pre
    )


def read_vocab(tokenizer_dir: str | os.PathLike, vocab_size: int) -> GGUFVocab:
    """The tokenizer folder (a checkpoint) as GGUF tokenizer metadata, padded to `vocab_size`."""
    tokenizer_dir = Path(tokenizer_dir)
    if (tokenizer_dir / SPM_FILE).is_file():
        vocab = _sentencepiece_vocab(tokenizer_dir)
    elif (tokenizer_dir / "tokenizer.json").is_file():
        vocab = _byte_level_bpe_vocab(tokenizer_dir)
    else:
        raise GGUFExportError(f"{tokenizer_dir}: no {SPM_FILE} or tokenizer.json to export")
    tokenizer = load_tokenizer(tokenizer_dir)
    vocab.special_ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    # Ask the tokenizer what it does: transformers 5 keeps BOS in the tokenizer.json post-processor
    # and its `add_bos_token` attribute can say False while encode() still adds it.
    probe = tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    vocab.add_bos = bos is not None and probe[:1] == [bos]
    vocab.add_eos = eos is not None and len(probe) > 1 and probe[-1:] == [eos]
    vocab.chat_template = getattr(tokenizer, "chat_template", None)
    return _pad_vocab(vocab, vocab_size, tokenizer_dir)


# --- tensors ---------------------------------------------------------------------------------


def permute_rotary(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF Llama rotates dims (i, i + head_dim/2) of each head together; llama.cpp's "llama" rope
    rotates adjacent dims (2i, 2i+1). Reordering the q/k output rows this way makes the two agree;
    it is convert_hf_to_gguf's `permute`."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama3_rope_factors(cfg: LLMConfig) -> torch.Tensor:
    """Per-frequency divisors for Llama-3 rope scaling, written as rope_freqs (as llama.cpp's
    converter does): llama.cpp has no "llama3" scaling type of its own."""
    rope = cfg.rope_scaling or {}
    dim = cfg.head_size
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            out.append(1.0)
        elif wavelen > old_context / low:
            out.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


# name in the GGUF -> (shape, loader of the final tensor)
TensorPlan = dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]


def plan_tensors(
    cfg: LLMConfig, hf_shapes: dict[str, tuple[int, ...]], read: Callable[[str], torch.Tensor]
) -> TensorPlan:
    """Map HF causal-LM tensor names (without the `llm.` prefix) to GGUF names, with the family's
    changes (Llama: rotary permutation on q/k; Gemma: norms plus one). `read(hf_name)` loads one
    tensor when it is written."""
    import gguf

    family = LLM_FAMILIES[cfg.arch]
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, family.gguf_arch), cfg.num_layers)
    plan: TensorPlan = {}
    for hf_name, shape in hf_shapes.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope_freq_base
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp falls back to token_embd when output.weight is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"no GGUF name for LLM tensor {hf_name!r}")
        n_head = None
        if family.permute_rotary and hf_name.endswith("self_attn.q_proj.weight"):
            n_head = cfg.num_heads
        elif family.permute_rotary and hf_name.endswith("self_attn.k_proj.weight"):
            n_head = cfg.num_kv_heads
        shift = family.norm_shift if hf_name.endswith("norm.weight") else 0.0

        def load(hf_name: str = hf_name, n_head: int | None = n_head, shift: float = shift):
            tensor = read(hf_name)
            if shift:
                tensor = tensor.float() + shift
            return permute_rotary(tensor, n_head) if n_head else tensor

        plan[gguf_name] = (tuple(shape), load)
    if "token_embd.weight" not in plan:
        raise GGUFExportError("the LLM has no token embedding (model.embed_tokens.weight)")
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        plan["rope_freqs.weight"] = ((cfg.head_size // 2,), lambda: llama3_rope_factors(cfg))
    return plan


def _as_array(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    # Norms, biases and rope factors are tiny and precision-critical: f32 (llama.cpp's rule).
    target = torch.float16 if dtype == "f16" and tensor.dim() >= 2 else torch.float32
    return tensor.detach().to(target).contiguous().numpy()


# --- writer ----------------------------------------------------------------------------------


def _add_hparams(writer: Any, cfg: LLMConfig, dtype: str) -> None:
    import gguf

    if cfg.arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern(GEMMA3_GLOBAL_EVERY)
        writer.add_rope_freq_base_swa(cfg.rope_local_theta)
    writer.add_key_length(cfg.head_size)
    writer.add_value_length(cfg.head_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_size)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
    )
    rope = cfg.rope_scaling or {}
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):  # llama3 is carried by the rope_freqs tensor
        raise GGUFExportError(
            f"rope scaling {kind!r} is not supported by the GGUF export (default, linear, llama3)"
        )


def _add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
    }
    for kind, token_id in vocab.special_ids.items():
        if token_id is not None:
            adders[kind](int(token_id))
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.remove_extra_whitespaces is not None:
        writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf_tensors(
    cfg: LLMConfig,
    plan: TensorPlan,
    vocab: GGUFVocab,
    out_path: str | os.PathLike,
    dtype: str = "f16",
    name: str = "cxrlite-llm",
) -> Path:
    """Write a GGUF of the family's architecture from a tensor plan, one tensor in memory at a time, atomically.
    Public so that random-weight benchmarks at real sizes can stream their own tensors."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"GGUF dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        arch = getattr(gguf.MODEL_ARCH, LLM_FAMILIES[cfg.arch].gguf_arch)
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[arch])
        try:
            writer.add_name(name)
            _add_hparams(writer, cfg, dtype)
            _add_vocab(writer, vocab)
            for gguf_name, (shape, _) in plan.items():
                np_dtype = np.float16 if dtype == "f16" and len(shape) >= 2 else np.float32
                nbytes = math.prod(shape) * np.dtype(np_dtype).itemsize
                writer.add_tensor_info(gguf_name, shape, np.dtype(np_dtype), nbytes)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for gguf_name, (shape, load) in plan.items():
                array = _as_array(load(), dtype)
                if array.shape != shape:
                    raise GGUFExportError(f"tensor {gguf_name}: shape {array.shape} != {shape}")
                writer.write_tensor_data(array)
        finally:
            writer.close()
    logger.info("wrote %s (%s, %d tensors)", out_path, dtype, len(plan))
    return out_path


def write_gguf(
    ckpt_dir: str | os.PathLike, out_path: str | os.PathLike, dtype: str = "f16"
) -> Path:
    """The LLM of a cxrlite checkpoint (config.json `llm`, weights under `llm.`) as a GGUF."""
    from safetensors import SafetensorError, safe_open

    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"GGUF dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir}: no {WEIGHTS_FILE}")
    vocab = read_vocab(ckpt_dir, cfg.llm.vocab_size)
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            shapes = {
                key[len(LLM_PREFIX) :]: tuple(f.get_slice(key).get_shape())
                for key in f.keys()
                if key.startswith(LLM_PREFIX)
            }
            if not shapes:
                raise CheckpointError(f"{weights}: no LLM weights (names starting {LLM_PREFIX!r})")
            plan = plan_tensors(cfg.llm, shapes, lambda name: f.get_tensor(LLM_PREFIX + name))
            return write_gguf_tensors(cfg.llm, plan, vocab, out_path, dtype, name=ckpt_dir.name)
    except SafetensorError as e:
        raise CheckpointError(f"{weights}: corrupt or unreadable ({e})") from None


# --- parity ----------------------------------------------------------------------------------


def _default_prompts(vocab_size: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(5, vocab_size, size=n).tolist()] for n in (7, 19)]


def _max_diff(runner: Any, cases: list[tuple[list[Any], np.ndarray]]) -> float:
    worst = 0.0
    for segments, expected in cases:
        runner.reset()
        got = runner.eval(segments, all_logits=True)
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def gguf_parity(
    ckpt_dir: str | os.PathLike,
    gguf_path: str | os.PathLike,
    prompts: Sequence[Sequence[int]] | None = None,
    with_image: bool = True,
    n_threads: int | None = None,
) -> dict[str, Any]:
    """llama.cpp logits vs transformers fp32 logits at every position of each prompt.

    With `with_image`, "<s> t t <image>*n t..." also runs with the checkpoint's own image
    embeddings of a fixed random image: through CXRVLM's forward for transformers (image tokens
    attending to each other both ways where the family does), and fed to llama.cpp as token ids +
    batch.embd rows + token ids (the runtime's layout).

    `max_abs_diff_tokens` / `max_abs_diff_image` use an f32 KV cache and no flash attention, so
    they measure the file alone (an f32 GGUF matches to float rounding). `max_abs_diff_runtime`
    is the same text comparison with llama.cpp's defaults (f16 KV cache, flash attention), what
    serving sees."""
    from cxrlite.model.checkpoint import load
    from cxrlite.runtime.llamacpp import LlamaCppLLM

    model, _, cfg = load(ckpt_dir)
    prompts = [list(p) for p in prompts] if prompts else _default_prompts(cfg.llm.vocab_size)
    with torch.no_grad():
        text_cases = [
            ([ids], model.llm(input_ids=torch.tensor([ids])).logits[0].numpy()) for ids in prompts
        ]
        image_cases = []
        if with_image and cfg.image_token_id is not None:
            text = [t for t in prompts[0] if t != cfg.image_token_id]
            head, tail = text[:3], text[3:]
            ids = torch.tensor([head + [cfg.image_token_id] * cfg.n_image_tokens + tail])
            size = cfg.vision.image_size
            generator = torch.Generator().manual_seed(0)
            pixels = torch.randn(1, cfg.vision.num_channels, size, size, generator=generator)
            image = model.encode_image(pixels)
            # CXRVLM's forward: the image attended to as the family does (both ways in Gemma 3)
            logits = model(ids, image_embeds=image).logits
            image_cases.append(([head, image[0].numpy(), tail], logits[0].numpy()))
    n_ctx = max(len(p) for p in prompts) + cfg.n_image_tokens + 16
    strict = {"kv_type": "f32", "flash_attn": False}
    with LlamaCppLLM(gguf_path, n_ctx=n_ctx, n_threads=n_threads, **strict) as runner:
        result: dict[str, Any] = {"max_abs_diff_tokens": _max_diff(runner, text_cases)}
        if image_cases:
            result["max_abs_diff_image"] = _max_diff(runner, image_cases)
    with LlamaCppLLM(gguf_path, n_ctx=n_ctx, n_threads=n_threads) as runner:
        result["max_abs_diff_runtime"] = _max_diff(runner, text_cases)
    result["max_abs_logit"] = max(float(np.abs(e).max()) for _, e in text_cases)
    result["n_positions"] = sum(len(p) for p in prompts)
    logger.info("GGUF parity %s: %s", Path(gguf_path).name, result)
    return result
