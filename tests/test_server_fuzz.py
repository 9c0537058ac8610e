"""Hostile input never crashes the server nor leaks a traceback: a corpus of bad requests
(each with its status and error code), the size caps, the image-URL policy, and fuzzing with
hypothesis-generated bodies, and schemathesis over the OpenAPI schema."""

from __future__ import annotations

import http.server
import io
import json
import re
import struct
import threading
import zlib

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_testkit import chat_body, data_url, phantom_dicom, phantom_png, shared_runtime

from cxrlite.server import ServerSettings, create_app

PNG = phantom_png(11)
DICOM = phantom_dicom(12)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    runtime = shared_runtime(tmp_path_factory)
    with TestClient(create_app(runtime, ServerSettings(max_tokens_cap=2))) as client:
        yield client


def assert_error_shape(response, status: int | None = None, code: str | None = None) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and "Traceback" not in response.text
    if code is not None:
        assert error["code"] == code, error
    return error


# --- crafted images --------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 60_000) -> bytes:
    """A 100-byte PNG whose header claims side x side pixels."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _png_chunk(b"IEND", b""))  # fmt: skip


def dicom_without_pixels() -> bytes:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(DICOM))
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def flat_png() -> bytes:
    import numpy as np

    from cxrlite.imaging.write import png_bytes

    return png_bytes(np.full((32, 32), 128, np.uint8))


def user(*parts) -> dict:
    return {"model": "bundle", "messages": [{"role": "user", "content": list(parts)}]}


def image_part(url) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


TEXT = {"type": "text", "text": "Describe."}

# (id, JSON body or raw bytes, status, error code)
BAD_REQUESTS = [
    ("malformed-json", b'{"model": "bundle", "messages": [', 400, "invalid_request"),
    ("json-array", b"[1, 2]", 400, "invalid_request"),
    ("not-json", b"\xff\xfe\x00garbage", 400, "invalid_request"),
    ("no-messages", {"model": "bundle"}, 400, "invalid_request"),
    ("empty-messages", {"model": "bundle", "messages": []}, 400, "invalid_request"),
    ("model-not-string", {**user(TEXT), "model": 7}, 400, "invalid_request"),
    ("messages-not-list", {"model": "bundle", "messages": "hi"}, 400, "invalid_request"),
    ("unknown-role", {"model": "bundle", "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_request"),
    ("tool-role", {"model": "bundle", "messages": [{"role": "tool", "content": "hi"}]}, 400, "invalid_request"),
    ("content-number", {"model": "bundle", "messages": [{"role": "user", "content": 5}]}, 400, "invalid_request"),
    ("unknown-part", user({"type": "audio", "audio": "x"}), 400, "invalid_request"),
    ("part-without-type", user({"text": "hi"}), 400, "invalid_request"),
    ("no-user-message", {"model": "bundle", "messages": [{"role": "system", "content": "hi"}]}, 400, "no_user_message"),
    ("image-from-assistant", {"model": "bundle", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [image_part(data_url(PNG))]}]}, 400, "invalid_image_position"),
    ("two-images", user(image_part(data_url(PNG)), image_part(data_url(PNG)), TEXT), 400, "too_many_images"),
    ("two-images-two-messages", {"model": "bundle", "messages": [
        {"role": "user", "content": [image_part(data_url(PNG))]},
        {"role": "user", "content": [image_part(data_url(PNG))]}]}, 400, "too_many_images"),
    ("bad-base64", user(image_part("data:image/png;base64,!!notbase64!!"), TEXT), 400, "invalid_base64"),
    ("short-base64", user(image_part("data:image/png;base64,abc"), TEXT), 400, "invalid_base64"),
    ("empty-data-url", user(image_part("data:image/png;base64,"), TEXT), 400, "invalid_image_url"),
    ("gif-data-url", user(image_part("data:image/gif;base64,R0lGODlh"), TEXT), 400, "unsupported_image_type"),
    ("text-data-url", user(image_part("data:text/plain;base64,aGVsbG8="), TEXT), 400, "unsupported_image_type"),
    ("not-base64-data-url", user(image_part("data:image/png,rawbytes"), TEXT), 400, "invalid_image_url"),
    ("remote-url", user(image_part("https://example.com/cxr.png"), TEXT), 400, "image_url_not_allowed"),
    ("file-url", user(image_part("file:///etc/passwd"), TEXT), 400, "invalid_image_url"),
    ("bare-path", user(image_part("/etc/passwd"), TEXT), 400, "invalid_image_url"),
    ("gif-bytes-as-png", user(image_part(data_url(b"GIF89a" + bytes(64))), TEXT), 415, "not_an_image"),
    ("random-bytes", user(image_part(data_url(bytes(range(256)))), TEXT), 415, "not_an_image"),
    ("truncated-png", user(image_part(data_url(PNG[: len(PNG) // 2])), TEXT), 400, "truncated"),
    ("truncated-dicom", user(image_part(data_url(DICOM[:-500], "application/dicom")), TEXT), 400, "truncated"),
    ("png-bomb", user(image_part(data_url(png_bomb())), TEXT), 413, "image_too_large"),
    ("dicom-without-pixels", user(image_part(data_url(dicom_without_pixels(), "application/dicom")), TEXT), 422, "no_pixel_data"),
    ("flat-image", user(image_part(data_url(flat_png())), TEXT), 422, "degenerate_image"),
    ("prompt-too-long", user(TEXT | {"text": "heart " * 600}), 400, "context_length_exceeded"),
    ("image-token-in-text", user({"type": "text", "text": "compare <image> please"}), 400, "invalid_prompt"),
    ("unknown-model", {**user(TEXT), "model": "gpt-4o"}, 404, "model_not_found"),
    ("max-tokens-zero", {**user(TEXT), "max_tokens": 0}, 400, "invalid_request"),
    ("max-tokens-negative", {**user(TEXT), "max_tokens": -3}, 400, "invalid_request"),
    ("max-completion-tokens-zero", {**user(TEXT), "max_completion_tokens": 0}, 400, "invalid_request"),
    ("max-tokens-string", {**user(TEXT), "max_tokens": "many"}, 400, "invalid_request"),
    ("n-two", {**user(TEXT), "n": 2}, 400, "invalid_n"),
    ("temperature-negative", {**user(TEXT), "temperature": -0.5}, 400, "invalid_request"),
    ("temperature-nan", b'{"model": "bundle", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "invalid_request"),
    ("top-p-zero", {**user(TEXT), "top_p": 0}, 400, "invalid_request"),
    ("seed-negative", {**user(TEXT), "seed": -1}, 400, "invalid_request"),
    ("seed-huge", {**user(TEXT), "seed": 2**70}, 400, "invalid_request"),
    ("five-stops", {**user(TEXT), "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_stop"),
    ("stop-number", {**user(TEXT), "stop": 3}, 400, "invalid_request"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "code"), [c[1:] for c in BAD_REQUESTS],
                         ids=[c[0] for c in BAD_REQUESTS])  # fmt: skip
def test_bad_requests_get_typed_errors(client, body, status, code):
    if isinstance(body, bytes):
        response = client.post("/v1/chat/completions", content=body,
                               headers={"Content-Type": "application/json"})  # fmt: skip
    else:
        response = client.post("/v1/chat/completions", json=body)
    error = assert_error_shape(response, status, code)
    if code == "context_length_exceeded":  # the message gives the numbers
        assert re.search(
            r"the prompt takes \d{3,} tokens \(\d+ text, 0 image\); this model's "
            r"context holds 256",
            error["message"],
        ), error["message"]


def test_wrong_routes_and_methods(client):
    assert_error_shape(client.get("/v1/nothing"), 404, "not_found")
    assert_error_shape(client.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert_error_shape(client.post("/v1/reports", content=b"x",
                                   headers={"Content-Type": "text/plain"}), 400)  # fmt: skip
    ok = client.post(
        "/v1/chat/completions", json=chat_body("bundle", DICOM, mime="application/dicom")
    )
    assert ok.status_code == 200  # the corpus' images are fine when whole


def test_body_and_pixel_caps(tmp_path_factory):
    runtime = shared_runtime(tmp_path_factory)
    app = create_app(runtime, ServerSettings(max_body_mb=0.01, max_pixels=4096, max_tokens_cap=2))
    with TestClient(app) as client:
        big = chat_body("bundle", PNG, "x" * 20_000)
        assert_error_shape(client.post("/v1/chat/completions", json=big), 413, "request_too_large")

        def chunks():  # no Content-Length: the body is counted as it arrives
            yield json.dumps(big).encode()[:8000]
            yield json.dumps(big).encode()[8000:]

        streamed = client.post("/v1/chat/completions", content=chunks(),
                               headers={"Content-Type": "application/json"})  # fmt: skip
        assert_error_shape(streamed, 413, "request_too_large")
        upload = client.post("/v1/reports", files={"file": ("x.png", bytes(20_000), "image/png")})
        assert_error_shape(upload, 413, "request_too_large")
        # 96 x 96 = 9216 pixels, over the 4096 cap
        pixels = client.post("/v1/chat/completions", json=chat_body("bundle", PNG))
        error = assert_error_shape(pixels, 413, "image_too_large")
        assert "9216 pixels exceeds the limit of 4096" in error["message"]
        small = client.post("/v1/chat/completions", json=chat_body("bundle", phantom_png(13, 48)))
        assert small.status_code == 200


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        routes = {"/cxr.png": (200, PNG), "/moved": (302, b""), "/big.png": (200, bytes(50_000))}
        status, body = routes.get(self.path, (404, b"no"))
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "http://127.0.0.1:1/elsewhere.png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_remote_images_only_from_allowed_hosts(tmp_path_factory):
    runtime = shared_runtime(tmp_path_factory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        allowed = ServerSettings(
            allow_image_hosts=("127.0.0.1",), max_tokens_cap=2, max_body_mb=0.04
        )
        with TestClient(create_app(runtime, allowed)) as client:
            fetched = client.post(
                "/v1/chat/completions", json=user(image_part(f"{base}/cxr.png"), TEXT)
            )
            assert fetched.status_code == 200 and fetched.json()["cache_hit"] is not None
            for path, status, code in (("/missing.png", 400, "image_fetch_failed"),
                                       ("/moved", 400, "image_fetch_failed"),
                                       ("/big.png", 413, "image_too_large")):  # fmt: skip
                refused = client.post(
                    "/v1/chat/completions", json=user(image_part(base + path), TEXT)
                )
                error = assert_error_shape(refused, status, code)
                assert base not in error["message"]  # URLs are not echoed
        with TestClient(create_app(runtime, ServerSettings(max_tokens_cap=2))) as client:
            refused = client.post(
                "/v1/chat/completions", json=user(image_part(f"{base}/cxr.png"), TEXT)
            )
            assert_error_shape(refused, 400, "image_url_not_allowed")
    finally:
        server.shutdown()
        server.server_close()


# --- fuzzing ---------------------------------------------------------------------------------

FINITE = st.floats(allow_nan=False, allow_infinity=False)  # what JSON can carry
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | FINITE | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)  # fmt: skip
URLS = st.one_of(
    st.sampled_from([data_url(PNG), data_url(DICOM, "application/dicom"), data_url(flat_png()),
                     "data:image/png;base64,!!", "data:text/plain;base64,aGk=", "data:,",
                     "https://example.com/a.png", "file:///etc/passwd", "", "data:image/jpeg;base64,"]),
    st.text(max_size=24).map(lambda s: "data:image/png;base64," + s),
    st.binary(max_size=48).map(lambda b: data_url(b"\x89PNG\r\n\x1a\n" + b)),
    st.binary(max_size=48).map(lambda b: data_url(b, "application/dicom")),
)  # fmt: skip
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)})
IMAGE_PART = st.fixed_dictionaries({"type": st.just("image_url"),
                                    "image_url": st.fixed_dictionaries({"url": URLS}) | URLS})  # fmt: skip
FIRST_MESSAGE = st.fixed_dictionaries({
    "role": st.just("user"),
    "content": st.text(max_size=60) | st.tuples(IMAGE_PART, TEXT_PART).map(list)
               | st.lists(TEXT_PART | IMAGE_PART, min_size=1, max_size=3),
})  # fmt: skip
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "developer", "assistant"]),
    "content": st.text(max_size=60) | st.lists(TEXT_PART, min_size=1, max_size=2),
})  # fmt: skip
MESSAGES = st.tuples(FIRST_MESSAGE, st.lists(MESSAGE, max_size=2)).map(lambda t: [t[0], *t[1]])
OPTIONS = {
    "max_tokens": st.integers(1, 10**7), "max_completion_tokens": st.integers(1, 9),
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(0, 50),
    "seed": st.integers(0, 2**63), "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=4),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
}  # fmt: skip
# Mostly well-formed requests (so the fuzzing reaches images, prompts and generation), some with
# one field replaced by arbitrary JSON, some arbitrary throughout.
VALID_BODY = st.fixed_dictionaries(
    {"model": st.just("bundle"), "messages": MESSAGES | MESSAGES.flatmap(st.permutations)},
    optional=OPTIONS,
)
FIELDS = ["model", "messages", *OPTIONS]
NEAR_BODY = st.tuples(VALID_BODY, st.sampled_from(FIELDS), JSON).map(lambda t: {**t[0], t[1]: t[2]})
WILD_MESSAGE = st.fixed_dictionaries({"role": st.text(max_size=6) | JSON,
                                      "content": st.lists(TEXT_PART | IMAGE_PART | JSON) | JSON})  # fmt: skip
WILD_BODY = st.fixed_dictionaries({"model": st.text(max_size=8) | JSON,
                                   "messages": st.lists(WILD_MESSAGE, max_size=3) | JSON},
                                  optional={k: JSON for k in OPTIONS})  # fmt: skip
BODY = st.one_of(VALID_BODY, VALID_BODY, NEAR_BODY, WILD_BODY)


def check_answer(response) -> None:
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert_error_shape(response)
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        last = response.text.strip().split("\n\n")[-1]
        assert last == "data: [DONE]", last
    else:
        body = response.json()
        assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] <= 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=BODY)
def test_fuzzed_bodies_never_crash_the_server(client, body):
    check_answer(client.post("/v1/chat/completions", json=body))


@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_fuzzed_raw_bytes_never_crash_the_server(client, raw):
    check_answer(client.post("/v1/chat/completions", content=raw,
                             headers={"Content-Type": "application/json"}))  # fmt: skip


# --- schemathesis over the OpenAPI schema ----------------------------------------------------


def test_schemathesis_finds_no_server_errors(tmp_path_factory):
    """Every operation of the OpenAPI schema, with schemathesis-generated requests. Driven through
    hypothesis directly rather than schemathesis's pytest plugin, which breaks on new pytest
    releases (pytest 9.2 with schemathesis 4.32)."""
    # An app of its own: schemathesis runs (and ends) the app's lifespan itself.
    app = create_app(shared_runtime(tmp_path_factory), ServerSettings(max_tokens_cap=2))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5, [op.label for op in operations]
    statuses = []

    def check(case) -> None:
        response = case.call()
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.operation.label, response.text[:500])
        if response.status_code >= 400 and response.status_code != 401:
            error = json.loads(response.text)["error"]
            assert isinstance(error["message"], str) and "Traceback" not in response.text

    for operation in operations:
        run = given(case=operation.as_strategy())(check)
        settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))(run)()
    assert any(status < 300 for status in statuses) and any(status >= 400 for status in statuses)
