"""Choosing the next token (greedy, or temperature / top-k / top-p with a seed) and turning token
ids into streamed text that stops at stop strings.

Both are backend-independent: every LLM backend only returns logits, so a seed gives the same
draws on llama.cpp, GPTQ and PyTorch (up to their logits' differences).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy (top_p/top_k/seed unused). `stop` strings end generation and are
    not part of the text; `stop_token_ids` end it too (the tokenizer's EOS always does)."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def greedy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of logits [k, vocab] -> each row's greedy token (the first of equal maxima, as
    torch.argmax) and its log-probability: what `Sampler` gives at temperature 0, for every
    sequence of a decode step in one pass."""
    x = np.asarray(logits, dtype=np.float32)
    tokens = x.argmax(axis=1)
    top = x[np.arange(len(x)), tokens].astype(np.float64)
    # logsumexp around the maximum (the chosen token's logit): exp never overflows
    total = np.exp((x - top[:, None].astype(np.float32)).astype(np.float64)).sum(axis=1)
    return tokens, -np.log(total)


class Sampler:
    """Picks tokens from logits; one per generation (it owns the seeded random stream)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> tuple[int, float]:
        """(token id, its log-probability under the model's unmodified distribution)."""
        logp = log_softmax(logits)
        p = self.params
        if p.temperature == 0:
            token = int(np.argmax(logits))  # the first of equal maxima, as torch.argmax
            return token, float(logp[token])
        scaled = logp / p.temperature
        candidates = np.arange(scaled.shape[0])
        if 0 < p.top_k < len(candidates):
            candidates = np.argpartition(-scaled, p.top_k - 1)[: p.top_k]
        order = candidates[np.argsort(-scaled[candidates], kind="stable")]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        if p.top_p < 1:
            # The smallest set whose mass reaches top_p (the most likely token always stays).
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        index = int(np.searchsorted(np.cumsum(probs), self.rng.random() * probs.sum(), "right"))
        token = int(order[min(index, len(order) - 1)])
        return token, float(logp[token])


class TextStream:
    """Token ids in, text out as it becomes final.

    Text is held back while it ends in an incomplete UTF-8 character (byte-fallback pieces decode
    to U+FFFD until the character is complete) or in a prefix of a stop string, so no stop string
    (nor any start of one) ever reaches a client. The whole sequence is decoded at each step
    (SentencePiece spacing depends on the neighbours); at report lengths that costs microseconds.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.released = ""  # text already handed out
        self._text = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(
            self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def push(self, token_id: int) -> tuple[str, bool]:
        """(newly final text, whether a stop string was reached)."""
        self.ids.append(int(token_id))
        text = self._decode()
        if not text.startswith(self.released):
            # Decoding changed text already sent (not seen with SentencePiece); keep what was
            # sent and continue after it rather than send a correction.
            text = self.released + text[len(self.released) :]
        self._text = text
        start = max(0, len(self.released) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            return self._release(min(hits)), True
        end = len(text.rstrip("\ufffd"))
        held = max(
            (k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])),
            default=0,
        )
        return self._release(end - held), False

    def _release(self, end: int) -> str:
        end = max(end, len(self.released))
        piece = self._text[len(self.released) : end]
        self.released += piece
        return piece

    def flush(self) -> str:
        """What was held back, at the end of a generation that did not stop on a stop string."""
        return self._release(len(self._text))
