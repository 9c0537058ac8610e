"""SentencePiece tokenizer training, the transformers wrapper, prompt format and image tokens."""

from __future__ import annotations

import random

import pytest
import sentencepiece as spm
import torch

from cxrlite.model.config import PROMPT_TEMPLATES, get_preset
from cxrlite.model.tokenizer import (
    CHAT_TEMPLATES,
    TokenizerError,
    bind_tokenizer,
    encode_example,
    expand_image_tokens,
    format_prompt,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

WORDS = (
    "heart size normal enlarged cardiomegaly pleural effusion left right small moderate large "
    "pneumothorax consolidation lobe nodule edema pulmonary no acute cardiopulmonary process lungs "
    "are clear there is a the of with mm tube line catheter in place Findings Impression"
).split()


def report_corpus(n: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = get_preset("tiny")
    out = tmp_path_factory.mktemp("tok")
    return cfg, train_tokenizer(report_corpus(), cfg, out), out


def test_trained_tokenizer_layout(trained):
    cfg, tok, out = trained
    assert len(tok) == cfg.llm.vocab_size == 384
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.image_token == "<image>" and tok.image_token_id == 4
    assert {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"} <= {
        p.name for p in out.iterdir()
    }
    # The image token is one id wherever it sits in the text.
    for text in ("<image>", "a<image>b", "USER: <image>\nx", "<image><image>"):
        ids = tok.encode(text, add_special_tokens=False)
        assert ids.count(4) == text.count("<image>")
    assert tok.encode("heart")[0] == 1  # BOS added for plain text


def test_matches_sentencepiece_model(trained):
    """The transformers tokenizer and the .model file (read by GGUF export) give the same ids."""
    _, tok, out = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == len(tok)
    texts = report_corpus(100, seed=1) + [
        "USER: <image>\nIs there an effusion?\nASSISTANT: Small left effusion.",
        "Heart size 12.5 mm, é ü 日本",
        "two  spaces and\ttab\nnewline",
    ]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_save_load_round_trip(trained, tmp_path):
    _, tok, out = trained
    save_tokenizer(tok, tmp_path / "again")
    reloaded = load_tokenizer(tmp_path / "again")
    # The SentencePiece model travels with the tokenizer (GGUF export reads it).
    assert (tmp_path / "again" / "tokenizer.model").read_bytes() == (
        out / "tokenizer.model"
    ).read_bytes()
    texts = report_corpus(50, seed=2) + [
        "USER: <image>\nWhat is seen?\nASSISTANT: No acute process.</s>"
    ]
    for text in texts:
        ids = tok.encode(text)
        assert reloaded.encode(text) == ids
        assert reloaded.decode(ids, skip_special_tokens=True) == text.replace(
            "<image>", ""
        ).replace("</s>", "")
    assert reloaded.chat_template == tok.chat_template
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_format_prompt(trained):
    _, tok, _ = trained
    expected = "<s>USER: <image>\nIs there an effusion?\nASSISTANT:"
    assert format_prompt("cxr-chat-v1", "Is there an effusion?", with_image=True) == expected
    assert format_prompt(tok, "Is there an effusion?", with_image=True) == expected
    assert format_prompt(tok, "Findings?", with_image=False) == "<s>USER: Findings?\nASSISTANT:"
    # every config-valid name renders: ours, or the tokenizer's own ("own")
    assert (*CHAT_TEMPLATES, "own") == PROMPT_TEMPLATES
    with pytest.raises(TokenizerError, match="unknown prompt template"):
        format_prompt("alpaca", "x")


def test_encode_example_masks_prompt_and_expands_image(trained):
    _, tok, _ = trained
    ex = encode_example(
        tok, "Any effusion?", "Small left effusion.", with_image=True, n_image_tokens=5
    )
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels) and ids.count(4) == 5
    n_prompt = len(tok.encode(format_prompt(tok, "Any effusion?"), add_special_tokens=False)) + 4
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True) == "Small left effusion."
    # Prompt + answer ids equal the ids of the whole rendered conversation (chat template).
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Any effusion?"}]},
        {"role": "assistant", "content": "Small left effusion."},
    ]
    whole = tok.apply_chat_template(messages, tokenize=False)
    assert expand_image_tokens(tok.encode(whole, add_special_tokens=False), 4, 5) == ids


def test_expand_image_tokens():
    assert expand_image_tokens([1, 7, 4, 9], image_token_id=4, n_image_tokens=3) == [
        1,
        7,
        4,
        4,
        4,
        9,
    ]
    assert expand_image_tokens([1, 9], 4, 3) == [1, 9]
    out = expand_image_tokens(torch.tensor([1, 4, 9]), 4, 2)
    assert out.tolist() == [1, 4, 4, 9]
    with pytest.raises(ValueError, match="1-D"):
        expand_image_tokens(torch.tensor([[1, 4]]), 4, 2)


def test_training_errors(tmp_path):
    cfg = get_preset("tiny")
    with pytest.raises(TokenizerError, match="empty corpus"):
        train_tokenizer(["", "  "], cfg, tmp_path / "a")
    with pytest.raises(TokenizerError, match="smaller llm.vocab_size"):
        train_tokenizer(["ab ab"], get_preset("tiny", llm={"vocab_size": 4000}), tmp_path / "b")


def test_bind_tokenizer(trained):
    cfg, tok, _ = trained
    bound = bind_tokenizer(cfg.replace(image_token_id=None), tok)
    assert bound.image_token_id == 4
    assert (bound.llm.bos_token_id, bound.llm.eos_token_id, bound.llm.pad_token_id) == (1, 2, 3)
    assert bound.llm.vocab_size == 384


def test_a_prompt_that_places_the_image_itself_keeps_its_place():
    from cxrlite.model.tokenizer import _messages

    (message,) = _messages("Given the current frontal image only<image> Describe.", True)
    assert message["content"] == [
        {"type": "text", "text": "Given the current frontal image only"},
        {"type": "image"},
        {"type": "text", "text": " Describe."},
    ]
    (plain,) = _messages("Describe.", True)
    assert plain["content"] == [{"type": "image"}, {"type": "text", "text": "Describe."}]
