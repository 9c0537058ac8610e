"""cxrlite.server's life: /health while the model loads (503, then 200) and after a failed load,
and `cxrlite serve` end to end: it starts, answers and shuts down cleanly, and it exits
non-zero with a one-line reason when the bundle cannot be loaded."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from server_testkit import (
    PROMPT,
    WAIT_S,
    chat_body,
    free_port,
    metric,
    phantom_png,
    shared_runtime,
)

from cxrlite.runtime import Runtime
from cxrlite.server import ServerSettings, create_app


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return shared_runtime(tmp_path_factory)


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
        app.state.loader.thread.join(WAIT_S)
        assert client.get("/health").json()["status"] == "ok"
        assert (
            client.post("/v1/chat/completions", json=chat_body("bundle", None, "Hi")).status_code
            == 200
        )
        assert metric(client, "cxrlite_ready") == 1
        owned = app.state.loader.runtime
    assert owned.llm.llm._ctx is None  # the app made this runtime, so it closed it

    def broken() -> Runtime:
        return Runtime.from_bundle(bundle / "missing")

    app = create_app(broken, ServerSettings())
    with TestClient(app) as client:
        app.state.loader.thread.join(WAIT_S)
        failed = client.get("/health")
        assert failed.status_code == 503 and failed.json()["status"] == "error"
        assert "missing" in failed.json()["error"]
        refused = client.post("/v1/chat/completions", json=chat_body("bundle", None, "Hi"))
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_load_failed"


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


def bundle_without_manifest(bundle: Path, tmp_path: Path) -> tuple[Path, str]:
    broken = tmp_path / "no-manifest"
    broken.mkdir()
    return broken, "no manifest.json"


def bundle_missing_a_file(bundle: Path, tmp_path: Path) -> tuple[Path, str]:
    broken = tmp_path / "missing-file"
    broken.mkdir()
    shutil.copy(bundle / "manifest.json", broken)  # every file it lists is missing
    return broken, "is missing (listed in manifest.json)"


@pytest.mark.parametrize("make_broken", [bundle_without_manifest, bundle_missing_a_file])
def test_serve_command_exits_when_the_bundle_fails_to_load(runtime, tmp_path, make_broken):
    """A supervisor sees the failure: exit code 1 and one line naming the bundle and the problem
    (not a server that answers 503 forever)."""
    broken, problem = make_broken(runtime.bundle.path, tmp_path)
    command = [
        sys.executable,
        "-m",
        "cxrlite.cli",
        "serve",
        str(broken),
        "--port",
        str(free_port()),
    ]
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"Error: cannot serve {broken}: ") and problem in errors[0]
