"""cxrlite.server under load: a full queue answers 503, the next image is encoded while the LLM
decodes, a request past its deadline gets 504 and its generation is cancelled, and a client
that disconnects cancels its stream."""

from __future__ import annotations

import functools
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from server_testkit import (
    CAP,
    PROMPT,
    WAIT_S,
    chat_body,
    gated,
    live_server,
    phantom_png,
    sse_events,
)

from cxrlite.server import ServerSettings, create_app


def test_full_queue_answers_503_with_retry_after(runtime):
    app = create_app(runtime, ServerSettings(max_queue=1, max_tokens_cap=CAP))
    state = app.state
    body = chat_body("bundle", None, "Hello", max_tokens=4)
    with gated(runtime) as gate, live_server(app) as url, ThreadPoolExecutor(2) as pool:
        post = lambda: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)  # noqa: E731
        running = pool.submit(post)
        assert gate.stepping.wait(WAIT_S)  # the first request holds the LLM, between two tokens
        queued = pool.submit(post)
        assert state.scheduler.wait_for_depth(1, WAIT_S)  # the second waits in the queue
        refused = post()
        assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
        assert refused.json()["error"]["code"] == "queue_full"
        gate.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    assert 'cxrlite_requests_total{route="/v1/chat/completions",status="503"} 1.0' in metrics
    assert 'cxrlite_requests_total{route="/v1/chat/completions",status="200"} 2.0' in metrics


class SignallingVision:
    """Wraps the real vision backend; `encoded` is set once it has encoded an image."""

    def __init__(self, inner):
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.encoded = threading.Event()

    def encode(self, pixels):
        out = self.inner.encode(pixels)
        self.encoded.set()
        return out


def test_next_image_is_encoded_while_the_llm_decodes(runtime):
    app = create_app(runtime, ServerSettings(max_tokens_cap=CAP))
    text_only = chat_body("bundle", None, "Hello", max_tokens=4)
    with_image = chat_body("bundle", phantom_png(51), PROMPT, max_tokens=4)
    vision = SignallingVision(runtime.vision)
    runtime.vision = vision
    try:
        with gated(runtime) as gate, live_server(app) as url, ThreadPoolExecutor(2) as pool:
            post = functools.partial(httpx.post, f"{url}/v1/chat/completions", timeout=30)
            running = pool.submit(post, json=text_only)
            assert gate.stepping.wait(WAIT_S)  # the LLM is busy with the first request
            queued = pool.submit(post, json=with_image)
            assert vision.encoded.wait(WAIT_S)  # the second one's image is encoded meanwhile
            assert not running.done()
            gate.gate.set()
            assert running.result().status_code == 200
            assert queued.result().json()["cache_hit"] is False
    finally:
        runtime.vision = vision.inner


def test_timeout_answers_504_and_cancels_the_generation(make_client, runtime):
    client = make_client(request_timeout_s=0.5)
    state = client.app.state
    with gated(runtime) as gate:
        response = client.post("/v1/chat/completions", json=chat_body("bundle", None, "Hi"))
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        job = state.scheduler.current  # still inside the gated step
        assert job is not None and job.cancel_requested.is_set()
        gate.gate.set()
        assert job.finished.wait(WAIT_S) and job.result.finish_reason == "cancelled"
        assert job.result.usage["completion_tokens"] == 2
    # Streaming: the first token went out, so the timeout arrives as an error event.
    with gated(runtime) as gate:
        stream = client.post(
            "/v1/chat/completions", json=chat_body("bundle", None, "Hi", stream=True)
        )
        assert stream.status_code == 200
        last = json.loads(sse_events(stream.text)[-1])
        assert last["error"]["code"] == "timeout" and "[DONE]" not in stream.text
        job = state.scheduler.current
        gate.gate.set()
        assert job.finished.wait(WAIT_S) and job.result.finish_reason == "cancelled"
    assert (
        client.post(
            "/v1/chat/completions", json=chat_body("bundle", None, "Hi", max_tokens=2)
        ).status_code
        == 200
    )


def test_client_disconnect_cancels_the_stream(runtime):
    app = create_app(runtime, ServerSettings(max_tokens_cap=CAP))
    state = app.state
    body = chat_body("bundle", phantom_png(5), PROMPT, stream=True)
    with gated(runtime) as gate, live_server(app) as url, httpx.Client(base_url=url) as http:
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200  # headers come after the first token
            lines = response.iter_lines()
            first = next(lines)
            assert json.loads(first[len("data: ") :])["choices"][0]["delta"]["role"] == "assistant"
            if not gate.stepping.wait(WAIT_S):
                pytest.fail(f"the generation never asked for a second token: {list(lines)}")
            job = state.scheduler.current
        # the response is closed unread: the client has gone
        assert job.cancel_requested.wait(WAIT_S)
        gate.gate.set()
        assert job.finished.wait(WAIT_S)
        assert (
            job.result.finish_reason == "cancelled" and job.result.usage["completion_tokens"] < CAP
        )
        after = http.post("/v1/chat/completions", json={**body, "stream": False})
        assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] == CAP
        metrics = http.get("/metrics").text
    assert 'cxrlite_generations_finished_total{finish_reason="cancelled"} 1.0' in metrics
