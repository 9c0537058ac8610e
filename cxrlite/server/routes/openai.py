"""The OpenAI-compatible routes: `GET /v1/models` and `POST /v1/chat/completions` (JSON, or
server-sent events with `stream`). The generation itself is in cxrlite.server.chat."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from cxrlite.server.chat import sampling_kwargs, start_chat
from cxrlite.server.errors import ERROR_RESPONSES, APIError
from cxrlite.server.schemas import ChatCompletionRequest, chat_prompt

logger = logging.getLogger(__name__)

router = APIRouter()


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    runtime = request.app.state.loader.ready()
    bundle = runtime.bundle
    card = {
        "id": runtime.model_id,
        "object": "model",
        "created": request.app.state.loader.loaded_at,
        "owned_by": "cxrlite",
        "variants": runtime.variants,
        "n_ctx": runtime.llm.n_ctx,
        "available_variants": {
            "vision": sorted(bundle.vision_variants),
            "llm": sorted(bundle.llm_variants),
        },
    }
    record = bundle.provenance
    if record is not None:  # a published model: what it is and the terms it is held under
        card["published_model"] = {k: record[k] for k in ("model", "license", "restriction")}
    return {"object": "list", "data": [card]}


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES)
async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    settings = request.app.state.settings
    runtime = request.app.state.loader.ready()
    if body.model != runtime.model_id:
        raise APIError(
            404,
            f"the requested model does not exist; this server serves '{runtime.model_id}'",
            code="model_not_found",
            param="model",
        )
    prompt = chat_prompt(body)
    kwargs = sampling_kwargs(body, settings.max_tokens_cap)
    if settings.log_phi:
        messages = json.dumps(prompt.messages, ensure_ascii=False)
        logger.info("request %s messages: %s", request.state.request_id, messages)
    run = await start_chat(request, runtime, prompt, kwargs)
    if body.stream:
        return await run.stream(bool(body.stream_options and body.stream_options.include_usage))
    return await run.answer()
