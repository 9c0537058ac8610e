"""cxrlite.server's routes: health, models, the page and the OpenAPI schema; chat completions
(matching the runtime, streamed, stop strings, seeds, text only); the embedding cache; and the
openai client against a live server."""

from __future__ import annotations

import json

import openai
import pytest
from server_testkit import (
    CAP,
    PROMPT,
    chat_body,
    data_url,
    greedy,
    live_server,
    metric,
    phantom_png,
    sse_events,
)

from cxrlite.server import ServerSettings, create_app


def test_health_models_page_and_openapi(client, runtime):
    health = client.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["model"] == runtime.model_id
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    entry = models["data"][0]
    assert entry["id"] == runtime.model_id == "bundle"
    assert entry["variants"] == {"vision": "onnx-fp32", "llm": "gguf-f32"}
    assert entry["available_variants"] == {
        "vision": ["onnx-fp16", "onnx-fp32"],
        "llm": ["gguf-f32"],
    }
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert (
        "/v1/chat/completions" in page.text
        and "connect-src 'self'" in page.headers["content-security-policy"]
    )
    schema = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/reports", "/v1/models"} <= set(schema["paths"])
    assert health.headers["x-request-id"] != page.headers["x-request-id"]


def test_chat_completion_matches_the_runtime(client, runtime):
    image = phantom_png(1)
    want = greedy(runtime, image)
    response = client.post("/v1/chat/completions", json=chat_body("bundle", image, PROMPT))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == want.finish_reason == "length"  # max_tokens: the cap
    counts = {k: v for k, v in body["usage"].items() if k != "prompt_tokens_details"}
    assert counts == want.usage and body["usage"]["completion_tokens"] == CAP
    # `want` ran the same prompt just before: all of it but the last position came from the KV
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == want.usage["prompt_tokens"] - 1
    timings = body["timings"]
    assert set(timings) == {
        "queue_ms",
        "image_decode_ms",
        "preprocess_ms",
        "vision_ms",
        "prefill_ms",
        "ttft_ms",
        "decode_ms",
        "tokens_per_s",
        "total_ms",
    }
    assert 0 < timings["ttft_ms"] <= timings["total_ms"] and timings["tokens_per_s"] > 0
    assert timings["prefill_ms"] > 0 and timings["queue_ms"] >= 0
    # A longer max_tokens is capped; a shorter one is honoured.
    short = client.post(
        "/v1/chat/completions", json=chat_body("bundle", image, PROMPT, max_completion_tokens=3)
    )
    assert short.json()["usage"]["completion_tokens"] == 3
    assert want.text.startswith(short.json()["choices"][0]["message"]["content"])
    capped = client.post(
        "/v1/chat/completions", json=chat_body("bundle", image, PROMPT, max_tokens=10_000)
    )
    assert capped.json()["usage"]["completion_tokens"] == CAP


def test_stream_chunks_are_well_formed_and_add_up(client, runtime):
    image = phantom_png(2)
    plain = client.post("/v1/chat/completions", json=chat_body("bundle", image, PROMPT)).json()
    response = client.post(
        "/v1/chat/completions",
        json=chat_body(
            "bundle", image, PROMPT, stream=True, stream_options={"include_usage": True}
        ),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["model"] == "bundle"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, finish, usage = chunks[1:]
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert (
        "".join(c["choices"][0]["delta"]["content"] for c in content)
        == (plain["choices"][0]["message"]["content"])
    )
    assert len(content) >= 5  # streamed token by token, not in one piece
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "length",
    }
    assert finish["cache_hit"] is True and finish["timings"]["ttft_ms"] > 0
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert usage["choices"] == [] and all(usage["usage"][k] == plain["usage"][k] for k in counts)
    assert usage["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # same image and prompt
    # Without include_usage there is no usage chunk.
    bare = sse_events(
        client.post(
            "/v1/chat/completions", json=chat_body("bundle", image, PROMPT, stream=True)
        ).text
    )
    assert len(bare) == len(events) - 1 and "usage" not in json.loads(bare[-2])


def test_stop_strings_seed_and_text_only_chat(client, runtime):
    image = phantom_png(1)
    full = greedy(runtime, image).text
    assert len(full) > 12
    stop = full[6:9]
    cut = client.post("/v1/chat/completions", json=chat_body("bundle", image, PROMPT, stop=stop))
    assert cut.json()["choices"][0] == {
        "index": 0,
        "logprobs": None,
        "finish_reason": "stop",
        "message": {"role": "assistant", "content": full[: full.index(stop)]},
    }
    sampled = chat_body("bundle", image, PROMPT, temperature=1.0, top_p=0.9, seed=5)
    a, b = (client.post("/v1/chat/completions", json=sampled).json() for _ in range(2))
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    text_only = client.post(
        "/v1/chat/completions",
        json={
            "model": "bundle",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello"},
            ],
        },
    )
    want = runtime.complete([{"role": "user", "content": "Be brief.\nHello"}], max_tokens=CAP)
    assert text_only.json()["choices"][0]["message"]["content"] == want.text
    assert text_only.json()["cache_hit"] is None


def test_repeated_image_hits_the_cache(client, runtime):
    image = phantom_png(31)  # seen by no other test
    body = chat_body("bundle", image, PROMPT, max_tokens=2)
    first = client.post("/v1/chat/completions", json=body).json()
    assert first["cache_hit"] is False and first["timings"]["vision_ms"] > 0
    assert metric(client, "cxrlite_image_cache_misses_total") == 1
    second = client.post("/v1/chat/completions", json=body).json()
    assert second["cache_hit"] is True and second["timings"]["vision_ms"] == 0.0
    assert metric(client, "cxrlite_image_cache_hits_total") == 1
    assert metric(client, "cxrlite_image_cache_misses_total") == 1


# --- the openai client against a live server -------------------------------------------------


def test_openai_client_works_unchanged(runtime):
    app = create_app(runtime, ServerSettings(api_key="k3y", max_tokens_cap=CAP))
    image = phantom_png(7)
    want = greedy(runtime, image)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": PROMPT},
                {"type": "image_url", "image_url": {"url": data_url(image)}},
            ],
        }
    ]
    with live_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        assert [m.id for m in client.models.list()] == ["bundle"]
        completion = client.chat.completions.create(
            model="bundle", messages=messages, max_tokens=CAP
        )
        assert completion.choices[0].message.content == want.text
        assert completion.usage.completion_tokens == CAP
        assert completion.usage.prompt_tokens == want.usage["prompt_tokens"]
        stream = client.chat.completions.create(
            model="bundle", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want.text and chunks[-1].usage.total_tokens == want.usage["total_tokens"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=messages)
        with pytest.raises(openai.BadRequestError, match="n must be 1"):
            client.chat.completions.create(model="bundle", messages=messages, n=2)
        wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model="bundle", messages=messages)
