"""Shared pieces of the server tests: one tiny runtime per session, test clients around it,
images as data URLs, a gate that holds the LLM between tokens, a live uvicorn server on a free
loopback port, and readers of metrics and server-sent events."""

from __future__ import annotations

import base64
import contextlib
import socket
import threading
from collections.abc import Iterator

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from runtime_testkit import runtime_bundle

from cxrlite.imaging.decode import load_image
from cxrlite.imaging.write import dicom_bytes, png_bytes
from cxrlite.phantoms.generator import make_phantom_study
from cxrlite.runtime import Runtime
from cxrlite.server import ServerSettings, create_app

_RUNTIMES: dict[str, Runtime] = {}
GATE_TIMEOUT_S = 120.0  # a test that forgets to open a gate fails instead of hanging
PROMPT = "Describe the findings in this chest X-ray."
CAP = 16  # max_tokens_cap of the test apps: short generations keep the tests quick
WAIT_S = 60  # waits on events return as soon as they are set; this only bounds a failure


def shared_runtime(tmp_path_factory) -> Runtime:
    """The tiny bundle's runtime (ONNX fp32 + GGUF f32, one thread), opened once per session.
    Apps given a runtime (not a factory) never close it."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _RUNTIMES:
        _, _, bundle = runtime_bundle(tmp_path_factory)
        _RUNTIMES[key] = Runtime.from_bundle(
            bundle, threads=1, kv_type="f32", flash_attn=False, warmup=False
        )
    return _RUNTIMES[key]


@contextlib.contextmanager
def app_clients(runtime: Runtime) -> Iterator:
    """`make(**settings)`: a started TestClient of an app around `runtime` (max_tokens_cap CAP
    unless given); every client made is closed on leaving."""
    with contextlib.ExitStack() as stack:

        def make(**settings) -> TestClient:
            settings.setdefault("max_tokens_cap", CAP)
            client = TestClient(create_app(runtime, ServerSettings(**settings)))
            return stack.enter_context(client)

        yield make


def greedy(runtime: Runtime, image: bytes, max_tokens: int = CAP):
    """The runtime's own greedy answer to PROMPT about `image`, without its cache."""
    return runtime.complete(PROMPT, load_image(image), max_tokens=max_tokens, use_cache=False)


def metric(client, name: str, headers: dict | None = None, **labels: str) -> float:
    """A sample's value from the client's /metrics (0 when absent)."""
    text = client.get("/metrics", headers=headers or {}).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def sse_events(text: str) -> list[str]:
    """The data of each server-sent event of a complete stream."""
    assert text.endswith("\n\n")
    blocks = text.strip("\n").split("\n\n")
    assert all(b.startswith("data: ") for b in blocks)
    return [b[len("data: ") :] for b in blocks]


def phantom_png(seed: int, size: int = 96) -> bytes:
    _, pixels = make_phantom_study(seed, 0, size=size)
    return png_bytes(pixels)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def phantom_dicom(seed: int, patient_name: str | None = None, size: int = 256) -> bytes:
    """A phantom as DICOM; `patient_name` replaces the placeholder name (PHI tests). 256 px:
    the chest check's smallest side (cxrlite.pacs.chest.MIN_SIDE)."""
    import io

    import pydicom

    _, pixels = make_phantom_study(seed, 0, size=size)
    data = dicom_bytes(pixels.astype(np.uint8))
    if patient_name is None:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientName = patient_name
    ds.PatientID = "PID-" + patient_name
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def chat_body(
    model: str,
    image: bytes | None = None,
    text: str = "Describe the findings.",
    mime: str = "image/png",
    **extra,
) -> dict:
    content: list[dict] = []
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image, mime)}})
    content.append({"type": "text", "text": text})
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


class GatedDecoder:
    """Wraps the runtime engine's LLM decoder: after `free_steps` steps that decode a generated
    token, each such step (each token after the first) waits for `gate`, and `stepping` is set
    once a step waits, so a test can hold a generation mid-stream. Prefill never waits."""

    def __init__(self, inner, free_steps: int = 0) -> None:
        self.inner, self.free_steps = inner, free_steps
        self.gate = threading.Event()
        self.stepping = threading.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, items):
        if any(item.generated for item in items):
            if self.free_steps > 0:
                self.free_steps -= 1
            else:
                self.stepping.set()
                if not self.gate.wait(GATE_TIMEOUT_S):
                    raise TimeoutError("the test never opened the gate")
        return self.inner.decode(items)


@contextlib.contextmanager
def gated(runtime: Runtime, free_steps: int = 0) -> Iterator[GatedDecoder]:
    engine = runtime.engine
    wrapper = GatedDecoder(engine.decoder, free_steps)
    engine.decoder = wrapper
    try:
        yield wrapper
    finally:
        wrapper.gate.set()
        engine.decoder = wrapper.inner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_server(app) -> Iterator[str]:
    """Run `app` with uvicorn in a thread on 127.0.0.1; yields its base URL."""
    import uvicorn

    config = uvicorn.Config(
        app, host="127.0.0.1", port=free_port(), log_config=None, access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    try:
        while not server.started:  # uvicorn offers no event; its flag flips once it listens
            if not thread.is_alive():
                raise RuntimeError("uvicorn failed to start")
            thread.join(0.01)
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(15)
