"""Tokenizers for cxrlite: a SentencePiece model trained here, or a pretrained LLM's own.

A from-scratch LLM gets a SentencePiece BPE model (byte fallback, Llama's normalisation settings)
trained on the text corpus; `<image>` is a user-defined piece, so it is always one id. It is wrapped
as transformers' LlamaTokenizer and the `.model` file is kept beside `tokenizer.json` as
`tokenizer.model`: GGUF export reads tokens/scores/types from it (`tokenizer.ggml.model = "llama"`).

Canonical encoding: `encode(format_prompt(...), add_special_tokens=False)` — the prompt text carries
its own `<s>`. It equals `apply_chat_template(messages, add_generation_prompt=True)`, which is what
vLLM and transformers users get. Runtimes should feed these ids to the LLM rather than let another
tokenizer (llama.cpp's) re-tokenize the text: llama.cpp inserts a space after special tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from cxrlite.errors import CxrliteError
from cxrlite.model.config import DEFAULT_IMAGE_TOKEN, ModelConfig

logger = logging.getLogger(__name__)

SPM_FILE = "tokenizer.model"
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"


def _user_assistant_template(system: str, user_end: str) -> str:
    """A LLaVA-style conversation in Jinja: `system`, then "USER: " with the image part as
    "<image>\\n" before the text and `user_end` after it, then "ASSISTANT: " answers ending with
    EOS; the generation prompt is "ASSISTANT:"."""
    return (
        "{{ bos_token }}" + system + "{% for message in messages %}"
        "{% if message['role'] == 'user' %}USER: "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ image_token }}{{ '\\n' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}{{ '" + user_end + "' }}"
        "{% elif message['role'] == 'assistant' %}ASSISTANT: "
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
        "{{ eos_token }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )


# One Jinja source per prompt format; its rendering is the training and inference text.
CHAT_TEMPLATES = {
    "cxr-chat-v1": _user_assistant_template("", "\\n"),
    # LLaVA's conv_vicuna_v1 (LLaVA-Rad): system prompt, "USER: <image>\n{text} ASSISTANT:".
    "vicuna-v1": _user_assistant_template(
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. ",
        " ",
    ),
}


class TokenizerError(CxrliteError, ValueError):
    """A tokenizer could not be trained or loaded; the message names the corpus or folder."""


def _chat_template(name: str, image_token: str) -> str:
    if name not in CHAT_TEMPLATES:
        raise TokenizerError(
            f"unknown prompt template {name!r}; choose one of {sorted(CHAT_TEMPLATES)}"
        )
    # Bake the image token in so the template renders the same with or without our code.
    return CHAT_TEMPLATES[name].replace("{{ image_token }}", image_token)


def _messages(prompt: str, with_image: bool) -> list[dict[str, Any]]:
    """One user message: the image first, then the prompt; a prompt that writes the image token
    itself ("Given the current frontal image only<image> Provide ...", MAIRA-2's) places it."""
    if with_image and DEFAULT_IMAGE_TOKEN in prompt:
        content: list[dict[str, str]] = []
        for i, text in enumerate(prompt.split(DEFAULT_IMAGE_TOKEN)):
            if i:
                content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
        return [{"role": "user", "content": content}]
    content = [{"type": "image"}] if with_image else []
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def _render(
    name: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    bos: str = BOS,
    eos: str = EOS,
) -> str:
    """Render a named template as transformers' apply_chat_template does (same Jinja options)."""
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(_chat_template(name, DEFAULT_IMAGE_TOKEN)).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
    )


def format_prompt(template: Any, prompt: str, with_image: bool = True) -> str:
    """The generation prompt text ("<s>USER: <image>\\n{prompt}\\nASSISTANT:").

    `template` is a tokenizer (its chat_template) or a template name from CHAT_TEMPLATES.
    Encode the result with `add_special_tokens=False`; it already starts with the BOS text.
    """
    if isinstance(template, str):
        return _render(template, _messages(prompt, with_image), add_generation_prompt=True)
    if not getattr(template, "chat_template", None):
        raise TokenizerError(
            "this tokenizer has no chat_template; build it with cxrlite.model.tokenizer"
        )
    return template.apply_chat_template(
        _messages(prompt, with_image), tokenize=False, add_generation_prompt=True
    )


def encode_prompt_text(tokenizer: Any, text: str, cfg: ModelConfig) -> list[int]:
    """Token ids of a rendered prompt (`format_prompt`), as the model's own code makes them:
    `cfg.prompt_encoding` "whole" encodes it in one call (the image token is a special token);
    "tokenizer" too, the tokenizer adding its BOS (the template has none); "chunks" is LLaVA's tokenizer_image_token: one BOS, then each piece between image tokens
    encoded on its own (its own SentencePiece prefix space), `cfg.image_token_id` between."""
    if cfg.prompt_encoding in ("whole", "tokenizer"):
        return tokenizer.encode(text, add_special_tokens=cfg.prompt_encoding == "tokenizer")
    bos = tokenizer.bos_token or ""
    body = text[len(bos) :] if bos and text.startswith(bos) else text
    ids = [tokenizer.bos_token_id]
    for i, chunk in enumerate(body.split(cfg.image_token)):
        if i:
            ids.append(cfg.image_token_id)
        if chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def expand_image_tokens(
    input_ids: Sequence[int] | torch.Tensor, image_token_id: int, n_image_tokens: int
) -> list[int] | torch.Tensor:
    """Replace each image token by `n_image_tokens` copies (as transformers' LLaVA processor does),
    so the image embeddings fill those positions one-for-one (masked_scatter)."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 1:
            raise ValueError("expand_image_tokens takes one sequence (1-D); pad after expanding")
        repeats = torch.where(input_ids == image_token_id, n_image_tokens, 1)
        return torch.repeat_interleave(input_ids, repeats)
    out: list[int] = []
    for token in input_ids:
        out.extend([token] * n_image_tokens if token == image_token_id else [token])
    return out


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """An answer's ids as training appends them to the prompt: " answer" and the EOS."""
    return tokenizer.encode(" " + answer.strip() + tokenizer.eos_token, add_special_tokens=False)


def answer_prefix_ids(tokenizer: Any, prefix: str) -> list[int]:
    """The ids of an answer's opening words, as `encode_answer` encodes them within the whole
    answer (a SentencePiece piece never spans a space, so the prefix's ids are the answer's
    first ids); "" gives none."""
    return tokenizer.encode(" " + prefix.strip(), add_special_tokens=False) if prefix else []


def encode_example(
    tokenizer: Any,
    prompt: str,
    answer: str | None,
    *,
    with_image: bool,
    n_image_tokens: int,
) -> dict[str, list[int]]:
    """input_ids and labels (-100 on the prompt and image) for one instruction example.

    The prompt is encoded exactly as at inference and the answer appended, so training sees the
    same ids that generation starts from. With `answer=None` only the prompt is returned.
    """
    image_id = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "image_token", None) or "<image>")
    prompt_ids = tokenizer.encode(
        format_prompt(tokenizer, prompt, with_image), add_special_tokens=False
    )
    if with_image and prompt_ids.count(image_id) != 1:
        raise TokenizerError(
            "the image token did not encode to exactly one id; is it a special token?"
        )
    answer_ids = encode_answer(tokenizer, answer) if answer is not None else []
    prompt_ids = expand_image_tokens(prompt_ids, image_id, n_image_tokens)
    return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}


def with_template(tokenizer: Any, cfg: ModelConfig) -> Any:
    """The tokenizer with `cfg`'s prompt template as its chat_template (saved with it); "own"
    keeps the one the tokenizer came with."""
    if cfg.prompt_template == "own":
        if not getattr(tokenizer, "chat_template", None):
            raise TokenizerError("the tokenizer has no chat template of its own")
        return tokenizer
    tokenizer.chat_template = _chat_template(cfg.prompt_template, cfg.image_token)
    return tokenizer


def train_tokenizer(corpus: Iterable[str], cfg: ModelConfig, out_dir: str | os.PathLike) -> Any:
    """Train a SentencePiece BPE tokenizer of `cfg.llm.vocab_size` pieces, save it to `out_dir`
    (tokenizer.json, tokenizer_config.json, chat template, tokenizer.model) and return it."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sentences = [s for s in corpus if s and s.strip()]
    if not sentences:
        raise TokenizerError("cannot train a tokenizer on an empty corpus")
    # The prompt scaffold ("USER:", "ASSISTANT:") is in every instruction example; weight it so
    # its words get pieces of their own even when the corpus is report text only.
    conversation = _messages("", with_image=False) + [{"role": "assistant", "content": ""}]
    scaffold = _render(
        cfg.prompt_template, conversation, add_generation_prompt=False, bos="", eos=""
    )
    sentences += [scaffold] * max(1, len(sentences) // 10)
    model_file = tempfile.NamedTemporaryFile(suffix=".model", delete=False)
    try:
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences),
                model_writer=model_file,
                model_type="bpe",
                vocab_size=cfg.llm.vocab_size,
                # Llama's layout and normalisation, so llama.cpp's "llama" tokenizer reads it as-is.
                unk_id=0, bos_id=1, eos_id=2, pad_id=3, pad_piece=PAD,
                user_defined_symbols=[cfg.image_token],
                byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                normalization_rule_name="identity", add_dummy_prefix=True,
                remove_extra_whitespaces=False, character_coverage=1.0,
                num_threads=1, minloglevel=2,
            )  # fmt: skip
        except RuntimeError as e:
            raise TokenizerError(
                f"SentencePiece could not train {cfg.llm.vocab_size} pieces on {len(sentences)} "
                f"sentences: {e}. Use more text or a smaller llm.vocab_size."
            ) from None
        model_file.close()
        sp = spm.SentencePieceProcessor(model_file=model_file.name)
        vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        tokenizer = LlamaTokenizer(
            vocab=vocab,
            # SentencePiece BPE piece ids follow merge order, which is what the merges encode.
            merges=generate_merges(vocab),
            vocab_file=model_file.name,
            unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
            add_bos_token=True, add_eos_token=False,
            extra_special_tokens={"image_token": cfg.image_token},
        )  # fmt: skip
        save_tokenizer(with_template(tokenizer, cfg), out_dir)
    finally:
        model_file.close()
        os.unlink(model_file.name)
    logger.info(
        "trained a %d-piece SentencePiece tokenizer on %d sentences", len(vocab), len(sentences)
    )
    return load_tokenizer(out_dir)


def save_tokenizer(tokenizer: Any, out_dir: str | os.PathLike) -> None:
    """save_pretrained plus the SentencePiece model file, which save_pretrained does not copy."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    source = getattr(tokenizer, "vocab_file", None)
    if source and str(source).endswith(".model") and os.path.isfile(source):
        target = out_dir / SPM_FILE
        if not target.exists() or not os.path.samefile(source, target):
            shutil.copyfile(source, target)


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load a tokenizer folder written by `save_tokenizer` (or any local HF tokenizer folder)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / SPM_FILE).is_file():
        raise TokenizerError(f"{path}: no tokenizer.json or {SPM_FILE} found")
    try:
        # Never the folder's own code: a published model's config.json may name some (auto_map).
        return AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot load the tokenizer ({e})") from None


def load_pretrained_tokenizer(path: str | os.PathLike, cfg: ModelConfig) -> Any:
    """A pretrained LLM's tokenizer from a local folder, with the image token and our template."""
    from tokenizers import AddedToken

    tokenizer = load_tokenizer(path)
    if cfg.image_token not in tokenizer.get_vocab():
        token = AddedToken(cfg.image_token, special=True, normalized=False)
        tokenizer.add_special_tokens(
            {"extra_special_tokens": [token]}, replace_extra_special_tokens=False
        )
    if hasattr(tokenizer, "_set_model_specific_special_tokens"):
        # transformers 5's way to name a multimodal token (tokenizer.image_token, saved in
        # tokenizer_config.json), which LLaVA processors read; add_special_tokens cannot name it.
        tokenizer._set_model_specific_special_tokens({"image_token": cfg.image_token})
    if tokenizer.pad_token is None:
        # Reuse an existing token: padded positions are masked, and no embedding row is added.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return with_template(tokenizer, cfg)


def build_tokenizer(
    cfg: ModelConfig, out_dir: str | os.PathLike, corpus: Iterable[str] | None = None
) -> Any:
    """The tokenizer for `cfg`: the pretrained LLM's (cfg.llm.pretrained) or one trained on `corpus`."""
    if cfg.llm.pretrained:
        tokenizer = load_pretrained_tokenizer(cfg.llm.pretrained, cfg)
        save_tokenizer(tokenizer, out_dir)
        return tokenizer
    if corpus is None:
        raise TokenizerError("a from-scratch LLM needs a text corpus to train its tokenizer")
    return train_tokenizer(corpus, cfg, out_dir)


def bind_tokenizer(cfg: ModelConfig, tokenizer: Any) -> ModelConfig:
    """cfg with the tokenizer's image/special token ids and a vocabulary that covers it."""
    image_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise TokenizerError(f"the tokenizer has no {cfg.image_token!r} token")
    llm = dataclasses.replace(
        cfg.llm,
        vocab_size=max(cfg.llm.vocab_size, len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return cfg.replace(llm=llm, image_token_id=image_id)
