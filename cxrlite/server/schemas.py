"""The OpenAI chat-completions subset the server speaks: requests, and the bodies of answers.

Requests are validated by pydantic (FastAPI turns the models into the OpenAPI schema); what
pydantic cannot say (one image per conversation, images only from the user, n == 1) is checked
by `chat_prompt`, which raises `APIError`s (cxrlite.server.errors renders them). Error messages
never echo the request's text or image (patient data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cxrlite.server.errors import APIError

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_SEED = 2**64 - 1  # numpy's default_rng takes any non-negative integer; keep it to 64 bits


# --- requests --------------------------------------------------------------------------------


class _Model(BaseModel):
    # Unknown fields are ignored (clients send logit_bias, user, ...), as OpenAI-compatible
    # servers do; fields we do read are validated strictly enough that nothing reaches the model
    # with a surprising type.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL | str  # some clients send the URL string directly


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(_Model):
    # "developer" is OpenAI's newer name for "system"; tool roles have no meaning here.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)  # not OpenAI's; vLLM and llama.cpp's server take it too
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    def stop_strings(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise APIError(
                400,
                f"stop takes at most {MAX_STOP_STRINGS} strings",
                code="invalid_stop",
                param="stop",
            )
        return stop

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# --- requests -> the runtime's chat messages -------------------------------------------------


@dataclass
class ChatPrompt:
    messages: list[dict[str, Any]]  # the runtime's chat format (cxrlite.model.tokenizer's template)
    image_url: str | None  # the one image, as sent (data URL or remote URL)


def _text_of(message: ChatMessage) -> tuple[str, list[str]]:
    """(the message's text parts joined, its image URLs)."""
    if message.content is None:
        return "", []
    if isinstance(message.content, str):
        return message.content, []
    texts, images = [], []
    for part in message.content:
        if isinstance(part, TextPart):
            texts.append(part.text)
        else:
            url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
            images.append(url)
    return "\n".join(texts), images


def chat_prompt(request: ChatCompletionRequest) -> ChatPrompt:
    """The conversation in the runtime's format, with at most one image, placed first in its
    user message (as the model was trained: "<image>\\n" then the question). System messages are
    folded into the first user message: the model's chat template has no system turn."""
    if request.n != 1:
        raise APIError(
            400, "n must be 1: this server returns one choice", code="invalid_n", param="n"
        )
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    image_url: str | None = None
    for index, message in enumerate(request.messages):
        text, images = _text_of(message)
        if images and message.role != "user":
            raise APIError(
                400,
                f"messages[{index}]: only user messages may hold an image",
                code="invalid_image_position",
                param=f"messages.{index}",
            )
        if images and (image_url is not None or len(images) > 1):
            raise APIError(
                400,
                "one image per conversation is supported",
                code="too_many_images",
                param=f"messages.{index}",
            )
        if message.role in ("system", "developer"):
            system.append(text)
            continue
        if message.role == "user" and system and not any(m["role"] == "user" for m in messages):
            text = "\n".join([*system, text])
        parts: list[dict[str, str]] = []
        if images:
            image_url = images[0]
            parts.append({"type": "image"})
        parts.append({"type": "text", "text": text})
        messages.append({"role": message.role, "content": parts})
    if not any(m["role"] == "user" for m in messages):
        raise APIError(
            400,
            "the conversation needs at least one user message",
            code="no_user_message",
            param="messages",
        )
    return ChatPrompt(messages, image_url)


# --- responses -------------------------------------------------------------------------------


def openai_usage(usage: dict[str, int], timings: dict[str, float]) -> dict[str, Any]:
    """Token counts as OpenAI reports them: prompt positions served from the KV cache of an
    earlier request (the prompt-prefix cache) under prompt_tokens_details.cached_tokens."""
    cached = int(timings.get("prompt_cached_tokens", 0))
    return {**usage, "prompt_tokens_details": {"cached_tokens": cached}}


def completion_body(
    completion_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: dict[str, int],
    timings: dict[str, float],
    cache_hit: bool | None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "timings": timings,
        "cache_hit": cache_hit,
    }


def chunk_body(
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, str] | None = None,
    finish_reason: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` gives the usage-only chunk (no choices)."""
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    )
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }
