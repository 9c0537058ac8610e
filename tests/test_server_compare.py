"""cxrlite.bench.server_compare and cxrlite.bench.soak: the servers' command lines from a bundle,
readiness and guaranteed termination of managed servers, the ratio verdict, a real soak of
`cxrlite serve` and a 2-request compare against llama_cpp.server, both on the tiny bundle."""

from __future__ import annotations

import json
import operator
import re
import sys
from collections import Counter

import numpy as np
import psutil
import pytest
from runtime_testkit import runtime_bundle

from cxrlite.bench.server_compare import compare_level, compare_markdown, run_compare
from cxrlite.bench.servers import (
    ServerCompareError,
    ServerSpec,
    bundle_llm,
    cxrlite_spec,
    free_port,
    llama_cpp_spec,
    running_server,
)
from cxrlite.bench.soak import run_soak


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return runtime_bundle(tmp_path_factory)[2]


def _flags(command: list[str]) -> dict[str, str]:
    """--flag value pairs of a command line."""
    return {a: b for a, b in zip(command, command[1:], strict=False) if a.startswith("--")}


def test_both_servers_get_the_bundles_gguf_context_and_threads(bundle):
    llm = bundle_llm(bundle)
    assert llm.variant == "gguf-f32" and llm.gguf == bundle / "llm" / "llm-f32.gguf"
    assert llm.n_ctx == 256  # the tiny model's max_position_embeddings, under 4096
    ours = cxrlite_spec(bundle, 8123, 1, "gguf-f32")
    assert ours.command[:5] == [sys.executable, "-m", "cxrlite.cli", "serve", str(bundle)]
    assert _flags(ours.command) == {"--port": "8123", "--threads": "1", "--llm-variant": "gguf-f32"}
    assert ours.url == "http://127.0.0.1:8123" and ours.ready_path == "/health"
    theirs = llama_cpp_spec(llm.gguf, 8124, 1, llm.n_ctx)
    assert theirs.command[:3] == [sys.executable, "-m", "llama_cpp.server"]
    assert _flags(theirs.command) == {
        "--model": str(llm.gguf), "--host": "127.0.0.1", "--port": "8124", "--n_ctx": "256",
        "--n_threads": "1", "--n_threads_batch": "1", "--flash_attn": "true",
        "--interrupt_requests": "false",
    }  # fmt: skip
    assert theirs.ready_path == "/v1/models"
    with pytest.raises(ServerCompareError, match=r"not a GGUF.*\['gguf-f32'\]"):
        bundle_llm(bundle, "gptq-4bit")


def _level(rps: float, ttft: float, tpot: float, latency: float, itl: float = 1.0) -> dict:
    def stats(x: float) -> dict:
        return {"n": 4, "p50": x, "p90": 2 * x}

    return {"requests_per_s": rps, "tokens_per_s": 32 * rps, "ttft_ms": stats(ttft),
            "itl_ms": stats(itl), "tpot_ms": stats(tpot), "latency_ms": stats(latency)}  # fmt: skip


def test_ratio_verdict_allows_the_tolerance_and_no_more():
    theirs = _level(10.0, 20.0, 2.0, 100.0)
    same = compare_level(_level(9.6, 20.8, 2.0, 104.0), theirs, tolerance=0.05)
    assert same["requests_per_s"] == pytest.approx(0.96)
    assert same["ttft_ms_p90"] == pytest.approx(1.04) and same["equal_or_better"]
    slower = compare_level(_level(12.0, 21.2, 1.0, 50.0), theirs, tolerance=0.05)
    assert slower["ttft_ms_p50"] == pytest.approx(1.06) and not slower["equal_or_better"]
    assert not compare_level(_level(9.4, 10.0, 1.0, 50.0), theirs, 0.05)["equal_or_better"]
    assert not compare_level(_level(12.0, 10.0, 2.2, 50.0), theirs, 0.05)["equal_or_better"]
    # ITL is reported, not judged (a bursty stream has a near-zero ITL)
    bursty = compare_level(_level(10.0, 20.0, 2.0, 100.0, itl=9.0), theirs, tolerance=0.05)
    assert bursty["itl_ms_p50"] == pytest.approx(9.0) and bursty["equal_or_better"]


def test_a_server_that_exits_or_never_gets_ready_is_reported_and_stopped(tmp_path):
    crash = ServerSpec("crash", [sys.executable, "-c", "raise SystemExit(3)"], free_port(), "/")
    with pytest.raises(ServerCompareError, match="exited with code 3 .*crash.log"):
        with running_server(crash, tmp_path / "crash.log", start_timeout=30):
            pass
    script = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    mute = ServerSpec("mute", [sys.executable, "-c", script], free_port(), "/")
    with pytest.raises(ServerCompareError, match="not ready after 1 s"):
        with running_server(mute, tmp_path / "mute.log", start_timeout=1):
            pass
    pid = int(re.findall(r"^(\d+)$", (tmp_path / "mute.log").read_text(), re.M)[-1])
    assert not psutil.pid_exists(pid)  # interrupted and reaped


def test_a_ready_server_is_stopped_when_the_benchmark_fails(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    spec = ServerSpec("http", command, port, "/")
    with pytest.raises(KeyboardInterrupt):
        with running_server(spec, tmp_path / "http.log", start_timeout=30) as process:
            assert process.poll() is None
            raise KeyboardInterrupt  # as Ctrl-C in the middle of a run
    assert process.returncode is not None and not psutil.pid_exists(process.pid)


def test_soak_of_cxrlite_serve(bundle, tmp_path):
    result = run_soak(
        bundle, tmp_path, clients=2, duration=3.0, max_tokens=4, interval=0.5, distinct_images=3
    )
    assert result["requests"] == result["ok"] > 0 and result["errors"] == {}
    assert result["settings"]["images"] == 3
    assert result["errors_5xx"] == 0 and result["warmup_errors"] == {}
    assert result["load"]["tokens_per_request"]["max"] <= 4
    server = result["server"]
    assert server["alive_at_end"] and server["log_tracebacks"] == 0
    assert server["exit_code"] == 0  # stopped cleanly by SIGINT within the grace period
    assert not psutil.pid_exists(server["pid"])
    samples = result["rss_samples"]
    times = [t for t, _ in samples]
    # From the start of load (the first sample) to after its end: the load runs until its
    # deadline, so the last sample, taken once it stopped, is at least `duration` in.
    assert len(samples) >= 2 and times == sorted(times) and times[-1] >= 3.0
    rss = result["rss"]
    assert rss["start_mb"] == samples[0][1] > 50 and rss["end_mb"] == samples[-1][1]
    assert rss["max_mb"] == max(s[1] for s in samples)
    assert rss["max_drift"] == pytest.approx(rss["max_mb"] / rss["start_mb"] - 1)
    assert result["passed"] == rss["flat"]  # everything else passed above
    log = (tmp_path / "cxrlite.log").read_text()
    assert "ready in" in log
    # Image and text requests in turn (warm-up included): two prompt sizes, equally often.
    prompts = Counter(re.findall(r"completions -> 200 .* tokens (\d+) prompt", log))
    # warm-up: each of the 6 payloads (3 images, each followed by a text request) once
    assert len(prompts) == 2 and sum(prompts.values()) == result["requests"] + 6
    assert abs(operator.sub(*prompts.values())) <= 1


def test_compare_two_requests_at_concurrency_one(bundle, tmp_path):
    result = run_compare(bundle, tmp_path, concurrency=[1], requests=2, max_tokens=4, warmup=1)
    (row,) = result["levels"]
    for name in ("cxrlite", "llama_cpp"):
        level, probe = row[name], result["servers"][name]["probe"]
        assert level["ok"] == 2 and level["errors"] == {} and level["tokens"] > 0
        assert probe["status"] == 200 and 0 < probe["completion_tokens"] <= 4
        assert probe["prompt_tokens"] > 0
        assert result["servers"][name]["exit_codes"] and level["tokens_per_request"]["max"] <= 4
        if level["tokens_per_request"]["min"] > 1:  # time per token after the first
            assert level["tpot_ms"]["n"] == 2
            assert 0 < level["tpot_ms"]["p50"] < level["latency_ms"]["p50"]
    assert result["bundle"]["n_ctx"] == 256 and result["bundle"]["llm_variant"] == "gguf-f32"
    ratio = row["ratio"]["requests_per_s"]
    assert ratio == pytest.approx(
        row["cxrlite"]["requests_per_s"] / row["llama_cpp"]["requests_per_s"]
    )
    assert result["fixed_length"] == (not result["notes"])
    markdown = compare_markdown(result)
    assert "| 1 | cxrlite | 2 |" in markdown and "| 1 | llama_cpp | 2 |" in markdown
    assert json.loads(json.dumps(result))["schema"] == "cxrlite-server-compare/1"
    logs = [(tmp_path / f"{n}.log").read_text() for n in ("cxrlite", "llama_cpp")]
    assert all(log.count("\n=== ") == 1 for log in logs)  # each started once, one after the other


def test_distinct_images_differ_in_one_pixel_each():
    import io

    from PIL import Image

    from cxrlite.bench.loadtest import image_variant
    from cxrlite.imaging.write import png_bytes

    original = (np.random.default_rng(0).random((24, 32)) * 255).astype(np.uint8)
    variants = [image_variant(png_bytes(original), i) for i in range(1, 40)]
    assert len(set(variants)) == len(variants)  # every request its own picture
    for data in variants:
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert pixels.shape == original.shape and (pixels != original).sum() == 1
