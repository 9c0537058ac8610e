"""cxrlite.server: routes, streaming, the openai client against a live server, auth, the queue
(503 when full), timeouts (504), client disconnects, the embedding cache, health while loading,
metrics, no patient data in logs, and `cxrlite serve` end to end."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
pytest.importorskip("fastapi", reason="fastapi is not installed")
httpx = pytest.importorskip("httpx", reason="httpx is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from server_testkit import (  # noqa: E402
    chat_body,
    data_url,
    free_port,
    gated,
    live_server,
    phantom_dicom,
    phantom_png,
    shared_runtime,
)

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS  # noqa: E402
from cxrlite.imaging.decode import load_image  # noqa: E402
from cxrlite.runtime import Runtime  # noqa: E402
from cxrlite.server import ServerSettings, create_app  # noqa: E402
from cxrlite.server.security import exposure_warning  # noqa: E402

PROMPT = "Describe the findings in this chest X-ray."
CAP = 16  # max_tokens_cap of the test apps: every generation is a few milliseconds
WAIT_S = 60  # waits on events return as soon as they are set; this only bounds a failure


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return shared_runtime(tmp_path_factory)


@pytest.fixture
def make_client(runtime):
    """Apps around the shared runtime with the given settings, closed at the test's end."""
    clients = []

    def make(**settings) -> TestClient:
        settings.setdefault("max_tokens_cap", CAP)
        client = TestClient(create_app(runtime, ServerSettings(**settings)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()


def metric(client: TestClient, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    blocks = text.strip("\n").split("\n\n")
    assert all(b.startswith("data: ") for b in blocks)
    return [b[len("data: ") :] for b in blocks]


def greedy(runtime, image: bytes, max_tokens: int = CAP):
    return runtime.complete(PROMPT, load_image(image), max_tokens=max_tokens, use_cache=False)


# --- routes ----------------------------------------------------------------------------------


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


def test_reports_route_for_png_and_dicom(client, runtime):
    png = phantom_png(3)
    response = client.post(
        "/v1/reports", files={"file": ("study.png", png, "image/png")}, data={"max_tokens": "8"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "bundle" and body["variants"] == runtime.variants
    assert list(body["labels"]) == list(CHEXPERT_OBSERVATIONS)
    assert body["usage"]["completion_tokens"] == 16  # findings + impression, 8 each
    direct = runtime.report(load_image(png), max_tokens=8)
    assert (body["findings"], body["impression"], body["labels"]) == (
        direct["findings"],
        direct["impression"],
        direct["labels"],
    )
    assert body["timings"]["queue_ms"] >= 0 and body["timings"]["request_ms"] > 0
    dicom = client.post(
        "/v1/reports", files={"file": ("x.dcm", phantom_dicom(4), "application/dicom")}
    )
    assert dicom.status_code == 200 and dicom.json()["cache_hit"] is False
    again = client.post(
        "/v1/reports", files={"file": ("x.dcm", phantom_dicom(4), "application/dicom")}
    )
    assert (
        again.json()["cache_hit"] is True and again.json()["findings"] == dicom.json()["findings"]
    )
    missing = client.post("/v1/reports", data={"max_tokens": "8"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    empty = client.post("/v1/reports", files={"file": ("x.png", b"", "image/png")})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_file"
    bad = client.post("/v1/reports", files={"file": ("x.png", b"GIF89a" + bytes(40), "image/png")})
    assert bad.status_code == 415 and bad.json()["error"]["code"] == "not_an_image"


# --- auth ------------------------------------------------------------------------------------


def test_api_key_guards_everything_but_health_and_page(make_client):
    client = make_client(api_key="s3cret")
    body = chat_body("bundle", None, "Hello", max_tokens=2)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
    ):
        response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.post("/v1/reports").status_code == 401  # refused before the body is read
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/chat/completions", json=body, headers=ok).status_code == 200
    assert client.get("/metrics", headers=ok).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    assert metric_with_key(client, ok) == 7  # four chat attempts, models, metrics, reports


def metric_with_key(client, headers) -> float:
    text = client.get("/metrics", headers=headers).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "cxrlite_errors_total" and sample.labels["code"] == "invalid_api_key":
                return sample.value
    return 0.0


def test_cors_is_off_unless_an_origin_is_allowed(make_client):
    preflight = {
        "Origin": "https://viewer.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    closed = make_client(api_key="k")
    assert (
        "access-control-allow-origin"
        not in closed.options("/v1/chat/completions", headers=preflight).headers
    )
    opened = make_client(api_key="k", cors_origins=("https://viewer.example",))
    answer = opened.options("/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200  # preflights carry no key; the real request must
    assert answer.headers["access-control-allow-origin"] == "https://viewer.example"
    models = opened.get(
        "/v1/models", headers={"Origin": "https://viewer.example", "Authorization": "Bearer k"}
    )
    assert models.headers["access-control-allow-origin"] == "https://viewer.example"
    other = opened.options(
        "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "key") is None


# --- concurrency: queue, timeout, disconnect -------------------------------------------------


def test_full_queue_answers_503_with_retry_after(runtime):
    app = create_app(runtime, ServerSettings(max_queue=1, max_tokens_cap=CAP))
    state = app.state.server
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
    state = client.app.state.server
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


def test_report_timeout_cancels_between_tokens(make_client, runtime):
    client = make_client(request_timeout_s=0.5)
    state = client.app.state.server
    with gated(runtime, free_steps=1) as gate:
        response = client.post(
            "/v1/reports", files={"file": ("study.png", phantom_png(8), "image/png")}
        )
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        job = state.scheduler.current  # held inside the findings' third token
        assert job is not None and job.cancel_requested.is_set()
        gate.gate.set()
        assert job.finished.wait(WAIT_S)
    # the findings stopped at 3 tokens and the impression never started
    assert job.result["finish_reason"] == {"findings": "cancelled", "impression": "cancelled"}
    assert job.result["usage"]["completion_tokens"] == 3


def test_client_disconnect_cancels_the_stream(runtime):
    app = create_app(runtime, ServerSettings(max_tokens_cap=CAP))
    state = app.state.server
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


# --- health while loading, failures ----------------------------------------------------------


def test_health_is_503_while_loading_then_200(runtime):
    release = threading.Event()
    bundle = runtime.bundle.path

    def load() -> Runtime:
        assert release.wait(30)
        return Runtime.from_bundle(bundle, threads=1, warmup=True)

    app = create_app(load, ServerSettings(max_tokens_cap=4))
    with TestClient(app) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        busy = client.post("/v1/chat/completions", json=chat_body("bundle", None, "Hi"))
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "model_loading"
        assert metric(client, "cxrlite_ready") == 0
        release.set()
        app.state.server.loader.join(WAIT_S)
        assert client.get("/health").json()["status"] == "ok"
        assert (
            client.post("/v1/chat/completions", json=chat_body("bundle", None, "Hi")).status_code
            == 200
        )
        assert metric(client, "cxrlite_ready") == 1
        owned = app.state.server.runtime
    assert owned.llm.llm._ctx is None  # the app made this runtime, so it closed it

    def broken() -> Runtime:
        return Runtime.from_bundle(bundle / "missing")

    app = create_app(broken, ServerSettings())
    with TestClient(app) as client:
        app.state.server.loader.join(WAIT_S)
        failed = client.get("/health")
        assert failed.status_code == 503 and failed.json()["status"] == "error"
        assert "missing" in failed.json()["error"]
        refused = client.post("/v1/chat/completions", json=chat_body("bundle", None, "Hi"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_load_failed"


class FailingVision:
    """A vision backend that breaks with a message quoting patient data."""

    def __init__(self, inner, patient: str):
        self.name, self.device, self.patient = inner.name, inner.device, patient

    def encode(self, pixels):
        raise RuntimeError(f"backend exploded near {self.patient}")


def test_unexpected_errors_are_500_with_an_id_and_no_traceback(client, runtime, caplog):
    inner = runtime.vision
    runtime.vision = FailingVision(inner, "DOE^" + "JOHN")
    try:
        with caplog.at_level(logging.DEBUG):
            response = client.post(
                "/v1/chat/completions", json=chat_body("bundle", phantom_png(41), PROMPT)
            )
    finally:
        runtime.vision = inner
    assert response.status_code == 500
    error = response.json()["error"]
    assert (
        error["code"] == "internal_error" and response.headers["x-request-id"] in error["message"]
    )
    assert "Traceback" not in response.text and "DOE" not in response.text
    assert "RuntimeError: <message withheld>" in caplog.text and "encode" in caplog.text
    assert "DOE^JOHN" not in caplog.text


# --- patient data ----------------------------------------------------------------------------

SENTINEL = "SENTINEL-PROMPT-7c1f9"


def test_no_patient_data_in_logs_or_errors(make_client, caplog):
    client = make_client()
    dicom = phantom_dicom(6, patient_name="DOE^JOHN")
    texts = []
    with caplog.at_level(logging.DEBUG):
        ok = client.post(
            "/v1/chat/completions",
            json=chat_body("bundle", dicom, f"{SENTINEL} describe", mime="application/dicom"),
        )
        assert ok.status_code == 200
        report = client.post(
            "/v1/reports", files={"file": ("DOE^JOHN.dcm", dicom, "application/dicom")}
        )
        assert report.status_code == 200
        refused = [
            client.post("/v1/chat/completions", json=chat_body("nope", dicom, SENTINEL)),
            client.post(
                "/v1/chat/completions",
                json=chat_body(
                    "bundle", dicom[: len(dicom) - 300], SENTINEL, mime="application/dicom"
                ),
            ),
            client.post(
                "/v1/chat/completions",
                json={"model": "bundle", "messages": [{"role": SENTINEL, "content": SENTINEL}]},
            ),
            client.post(
                "/v1/chat/completions",
                json={
                    "model": "bundle",
                    "messages": [
                        {"role": "user", "content": [{"type": SENTINEL, "text": SENTINEL}]}
                    ],
                },
            ),
            client.post(
                "/v1/chat/completions", json=chat_body("bundle", None, f"{SENTINEL} <image> twice")
            ),
            client.post(
                "/v1/reports", files={"file": ("DOE^JOHN.dcm", dicom[:400], "application/dicom")}
            ),
            client.post(
                "/v1/chat/completions", json=chat_body("bundle", None, SENTINEL + " word" * 400)
            ),
        ]
        texts = [r.text for r in refused]
    assert [r.status_code for r in refused] == [404, 400, 400, 400, 400, 400, 400]
    assert "request " in caplog.text  # the access lines were captured
    for text in [caplog.text, *texts]:
        assert "DOE" not in text and "JOHN" not in text and SENTINEL not in text


def test_log_phi_logs_prompts(make_client, caplog):
    client = make_client(log_phi=True)
    with caplog.at_level(logging.INFO, logger="cxrlite.server"):
        response = client.post(
            "/v1/chat/completions", json=chat_body("bundle", None, SENTINEL, max_tokens=2)
        )
    assert response.status_code == 200 and SENTINEL in caplog.text  # the guard above can fail


# --- the openai client against a live server -------------------------------------------------


def test_openai_client_works_unchanged(runtime):
    openai = pytest.importorskip("openai", reason="the openai client is not installed")
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


# --- cxrlite serve ---------------------------------------------------------------------------


def test_serve_command_starts_answers_and_shuts_down(runtime, tmp_path):
    port = free_port()
    env = {**os.environ, "CXRLITE_API_KEY": "envkey", "PYTHONPATH": str(Path.cwd())}
    # As `cxrlite serve` runs it: the CLI's logging set-up, then the command.
    script = (
        "from cxrlite.cli import setup_logging; setup_logging(0); "
        "from cxrlite.commands.serve import serve; serve()"
    )
    command = [
        sys.executable,
        "-c",
        script,
        str(runtime.bundle.path),
        "--port",
        str(port),
        "--threads",
        "1",
        "--max-tokens-cap",
        "4",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        url, status = f"http://127.0.0.1:{port}", None
        for _ in range(600):  # the model loads (and warms up) in the background
            try:
                status = httpx.get(f"{url}/health", timeout=1).json()["status"]
            except httpx.TransportError:
                status = None
            if status == "ok" or process.poll() is not None:
                break
            try:
                process.wait(0.05)  # doubles as the pause between polls
            except subprocess.TimeoutExpired:
                pass
        assert status == "ok", process.stderr.read1().decode() if process.poll() is not None else ""
        body = chat_body("bundle", phantom_png(8), PROMPT)
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 401
        ok = httpx.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer envkey"}
        )
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr.decode()
    log = stderr.decode()
    assert "Traceback" not in log and "POST /v1/chat/completions -> 200" in log
