"""cxrlite.bench: percentiles, bandwidth, the bench CLI's JSON on a tiny bundle, an isolated job,
the random-weight shape builder at reduced size, the fit check and bandwidth bound, the load test
against a local SSE stub, and the llama.cpp / vision micro-benchmarks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_testkit import runtime_bundle

from cxrlite.bench.bandwidth import last_level_cache_bytes, measure_bandwidth
from cxrlite.bench.loadtest import LoadTestError, check_loopback, run_loadtest
from cxrlite.bench.report import add_bandwidth_bounds, summarize
from cxrlite.bench.shapes import build_shape_bundle, fit_check, predicted_gguf_bytes, shape_config
from cxrlite.bench.worker import run_job_isolated
from cxrlite.cli import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return runtime_bundle(tmp_path_factory)


def _measured(stats: dict, n: int) -> bool:
    """`n` values were summarized and their median is a positive time or rate."""
    return stats["n"] == n and stats["p50"] > 0


def test_summarize_percentiles():
    stats = summarize(list(range(1, 101)))
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1)
    assert stats["p99"] == pytest.approx(99.01) and stats["mean"] == 50.5
    assert summarize([])["p50"] is None and summarize([])["n"] == 0


def test_bandwidth_is_positive():
    result = measure_bandwidth(size_mb=16, threads=2, repeats=2)
    assert result["read_gbs"] > 0 and result["copy_gbs"] > 0
    assert result["read_gbs"] == max(result["read_gbs_1thread"], result["read_gbs_threads"])


def test_bench_cli_json_schema(built, tmp_path):
    _, _, bundle = built
    out = tmp_path / "out"
    # `cxrlite bench BUNDLE ...`: the default subcommand, latency
    args = ["bench", str(bundle), "--runs", "2", "--warmup", "1", "--max-tokens", "8",
            "--threads", "1", "--vision-backends", "torch,onnx-fp32,onnx-int8",
            "--llm-variants", "torch,gguf-f32",
            "--no-isolate", "--bandwidth-mb", "16", "--out", str(out)]  # fmt: skip
    run = CliRunner().invoke(main, args, catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "Vision tower" in run.output and "gguf-f32" in run.output
    result = json.loads((out / "bench.json").read_text())
    assert result["schema"] == "cxrlite-bench/1"
    assert result["bundle"]["random_weights"] is False
    env = result["environment"]
    assert env["logical_cores"] >= 1 and env["ram_gb"] > 0 and env["versions"]["torch"]
    assert set(result["vision"]) == {"torch-fp32", "onnx-fp32"}
    assert "vision:onnx-int8" in result["skipped"]  # not in this bundle: listed, not fatal
    for phase in ("decode_ms", "preprocess_ms"):
        assert _measured(result["image"][phase], 2), phase
    for row in result["vision"].values():
        assert _measured(row["vision_ms"], 2)
        assert row["memory"]["peak_rss_mb"] > 0 and row["size_bytes"] > 0
    assert result["vision"]["torch-fp32"]["speedup_vs_torch"] == pytest.approx(1.0)
    assert set(result["llm"]) == {"torch-fp32", "gguf-f32"}
    for row in result["llm"].values():
        for key in ("prefill_ms", "ttft_ms", "e2e_ms", "tokens_per_s", "vision_ms"):
            assert _measured(row[key], 2), key
        assert _measured(row["itl_ms"], 2 * 7)  # exactly max_tokens per run: EOS never stops it
        assert row["ttft_ms"]["p50"] > row["prefill_ms"]["p50"]  # TTFT includes the image work
        assert row["e2e_ms"]["p50"] >= row["ttft_ms"]["p50"]
    gguf = result["llm"]["gguf-f32"]
    assert gguf["weights"]["bytes_read_per_token"] > 0
    bound = gguf["bandwidth_bound"]
    assert bound["bound_tokens_per_s"] > 0 and bound["percent_of_bound"] > 0
    assert gguf["tokens_per_s_vs_torch"] > 0 and result["fit"]["gguf-f32"]["cards"]["8GB"]["fits"]
    assert (out / "latency.png").stat().st_size > 1000
    assert "| gguf-f32 | cpu |" in (out / "bench.md").read_text()


def test_isolated_job_measures_its_own_process(built):
    _, _, bundle = built
    job = {"bundle": str(bundle), "kind": "vision", "spec": "onnx-fp32", "runs": 2, "warmup": 0,
           "threads": 1, "checkpoint": None}  # fmt: skip
    result = run_job_isolated(job, timeout=120)
    assert result["ok"], result
    assert result["memory"]["method"] == "subprocess peak RSS"
    assert result["memory"]["peak_rss_mb"] >= result["memory"]["baseline_rss_mb"] > 0
    assert len(result["vision_ms"]) == 2
    missing = run_job_isolated({**job, "spec": "onnx-int8"}, timeout=120)
    assert not missing["ok"] and "no vision variant" in missing["error"]


def test_bandwidth_bound_arithmetic():
    result = {
        "bandwidth": {"read_gbs": 10.0},
        "bundle": {"llm": {"layers": 2, "kv_heads": 1, "head_dim": 4}},
        "llm": {
            "x": {
                "device": "cpu",
                "weights": {"bytes_read_per_token": 1e8},
                "n_prompt": 9,
                "max_tokens": 3,
                "tokens_per_s": {"p50": 50.0},
            },
        },  # fmt: skip
    }
    add_bandwidth_bounds(result)
    bound = result["llm"]["x"]["bandwidth_bound"]
    kv = 2 * 2 * 1 * 4 * 2 * (9 + 1)  # K and V, 2 layers, 1 head of 4 dims, f16, mean position 10
    assert bound["kv_bytes_per_token"] == kv
    assert bound["bound_tokens_per_s"] == pytest.approx(10e9 / (1e8 + kv))
    assert bound["percent_of_bound"] == pytest.approx(100 * 50 / (10e9 / (1e8 + kv)))
    # 100 MB per token is no CPU cache's size; a few KB is every CPU cache's
    cache = last_level_cache_bytes()
    assert bound["fits_in_cache"] is False and bound["last_level_cache_bytes"] == cache
    result["llm"]["x"]["weights"]["bytes_read_per_token"] = 1000
    add_bandwidth_bounds(result)
    assert result["llm"]["x"]["bandwidth_bound"]["fits_in_cache"] is (cache is not None)


def test_fit_check_kv_cache_of_the_7b_shape():
    cfg = shape_config("7b")
    fit = fit_check(cfg, llm_bytes=4 * 2**30, vision_bytes=2**30, n_ctx=4096)
    # Llama-2-7B: 2 (K, V) x 32 layers x 32 heads x 128 dims x 4096 positions x 2 bytes = 2 GiB
    assert fit["parts_gb"]["kv_cache"] == 2.0
    # + 4 weights + 1 vision + 512 x (32000 + 2 x 11008 + 4 x 4096) x 4 B buffers + 600 MiB CUDA
    buffers = 512 * (32000 + 2 * 11008 + 4 * 4096) * 4 / 2**30
    assert fit["predicted_gb"] == pytest.approx(2 + 4 + 1 + buffers + 600 / 1024, abs=0.01)
    assert fit["cards"]["8GB"]["fits"] and fit["cards"]["8GB"]["headroom_gb"] < 0.5
    long = fit_check(cfg, llm_bytes=4 * 2**30, vision_bytes=2**30, n_ctx=8192)
    assert not long["cards"]["8GB"]["fits"] and long["cards"]["16GB"]["fits"]
    small = fit_check(cfg, 4 * 2**30, 2**30, 512, measured_bytes=5 * 2**30)
    assert small["cards"]["8GB"]["fits"] and small["cards"]["8GB"]["fits_measured"]


def test_shape_builder_reduced_size(tmp_path):
    from cxrlite.bench.report import gguf_weight_bytes
    from cxrlite.bundle import load_bundle
    from cxrlite.runtime.llamacpp import LlamaCppLLM

    shape = {"scale": 1 / 16, "layers": 2, "vision_layers": 1, "vocab_size": 2048}
    cfg = shape_config("1b", **shape)
    m = cfg.llm
    assert (m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size) == (128, 2, 1, 512)
    path = build_shape_bundle(
        "1b", llm_variants=["gguf-q4_k_m"], vision_variants=["onnx-fp32"], cache_dir=tmp_path,
        **shape,
    )  # fmt: skip
    bundle = load_bundle(path)
    assert set(bundle.llm_variants) == {"gguf-f16", "gguf-q4_k_m"}
    assert bundle.vision_variants["onnx-fp32"].entry["random_weights"] is True
    from cxrlite.bench.report import bundle_summary

    assert bundle_summary(bundle)["random_weights"] is True
    import gguf

    f16 = bundle.variant_file("llm", "gguf-f16")
    tensors = {t.name: tuple(int(x) for x in t.shape) for t in gguf.GGUFReader(str(f16)).tensors}
    # tied embeddings: token_embd + output_norm + 9 per layer (4 attention, 3 FFN, 2 norms)
    assert len(tensors) == 2 + 9 * 2
    assert tensors["token_embd.weight"] == (128, 2048)  # GGUF lists dims innermost first
    assert tensors["blk.0.attn_k.weight"] == (128, 64) and tensors["blk.1.ffn_down.weight"] == (
        512,
        128,
    )
    predicted = predicted_gguf_bytes(cfg)
    assert gguf_weight_bytes(f16)["tensor_bytes"] == predicted
    assert abs(f16.stat().st_size - predicted) / predicted < 0.05  # header + vocabulary on top
    with LlamaCppLLM(bundle.variant_file("llm", "gguf-q4_k_m"), n_ctx=64, n_threads=1) as llm:
        assert llm.n_vocab == 2048 and llm.n_embd == 128
        assert np.isfinite(llm.eval([[1, 5, 9]])).all()
    from cxrlite.model.tokenizer import load_tokenizer

    real = len(load_tokenizer(path / "tokenizer"))
    with LlamaCppLLM(f16, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as llm:
        logits = llm.eval([[1, 5, 9]], all_logits=True)
    # the padding past the tokenizer is never written: the random model streams real text
    assert real < 2048 and (np.abs(logits[:, real:]) < 1e-6).all()
    assert (logits[:, :real].max(axis=1) > 0).all()
    again = build_shape_bundle(
        "1b", llm_variants=["gguf-q4_k_m", "gguf-q8_0"], vision_variants=["onnx-fp32"],
        cache_dir=tmp_path, **shape,
    )  # fmt: skip
    assert again == path  # cached: reused, only the missing q8_0 added
    assert set(load_bundle(again).llm_variants) == {"gguf-f16", "gguf-q4_k_m", "gguf-q8_0"}
    assert f16.stat().st_mtime == bundle.variant_file("llm", "gguf-f16").stat().st_mtime


def test_llava_rad_shape_reduced_keeps_its_geometry(tmp_path):
    """The llava-rad shape at reduced width runs the real image geometry: 518 px, 1369 tokens."""
    from cxrlite.bundle import load_bundle
    from cxrlite.runtime.onnx_runner import onnx_session

    shape = {"scale": 1 / 12, "layers": 1, "vision_layers": 1, "vocab_size": 512}
    cfg = shape_config("llava-rad", **shape)
    assert cfg.vision.kind == "dinov2" and cfg.n_image_tokens == 1369
    assert cfg.vision.intermediate_size == 4 * cfg.vision.hidden_size == 256
    path = build_shape_bundle(
        "llava-rad", llm_variants=["gguf-f16"], vision_variants=["onnx-fp32"],
        cache_dir=tmp_path, **shape,
    )  # fmt: skip
    bundle = load_bundle(path)
    session = onnx_session(bundle.variant_file("vision", "onnx-fp32"), ["CPUExecutionProvider"])
    pixels = np.zeros((1, 3, 518, 518), np.float32)
    assert session.run(None, {"pixels": pixels})[0].shape == (1, 1369, cfg.llm.hidden_size)


# --- load test ---------------------------------------------------------------------------------


class FakeChat(BaseHTTPRequestHandler):
    """A minimal OpenAI-style SSE endpoint: five content chunks then usage; every third request
    is refused with 503 (a full queue)."""

    counter = 0
    lock = threading.Lock()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake-model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with FakeChat.lock:
            FakeChat.counter += 1
            refuse = FakeChat.counter % 3 == 0
        if refuse or self.headers.get("Authorization") != "Bearer k":
            self.send_response(503 if refuse else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        assert request["stream"] and request["messages"][0]["content"][1]["type"] == "image_url"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(5):
            chunk = {"choices": [{"delta": {"content": f"w{i} "}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [], "usage": {"completion_tokens": 5}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())


@pytest.fixture()
def fake_server():
    FakeChat.counter = 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeChat)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_loadtest_against_a_local_sse_stub(fake_server, tmp_path):
    image = tmp_path / "cxr.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    result = run_loadtest(
        fake_server, [1, 2], requests=6, image=str(image), max_tokens=5, api_key="k", warmup=0
    )
    assert result["model"] == "fake-model"
    for level in result["levels"]:
        assert level["requests"] == 6 and level["ok"] == 4 and level["errors"] == {"503": 2}
        assert level["tokens"] == 4 * 5 and level["tokens_per_s"] > 0
        assert level["ttft_ms"]["n"] == 4 and level["itl_ms"]["n"] == 4 * 4
        assert _measured(level["latency_ms"], 4)
    from cxrlite.bench.report import plot_throughput

    assert plot_throughput(result, tmp_path / "t.png").stat().st_size > 1000
    # requests 13 and 14 lack the key; 15 is a third request, refused before the key check
    unauthorized = run_loadtest(fake_server, [1], requests=3, warmup=0, image=str(image))
    assert unauthorized["levels"][0]["errors"] == {"401": 2, "503": 1}


def test_loadtest_refuses_remote_hosts():
    with pytest.raises(LoadTestError, match="non-loopback"):
        check_loopback("http://10.1.2.3:8000")
    check_loopback("http://10.1.2.3:8000", allow_remote=True)
    check_loopback("http://127.0.0.1:8000")
    with pytest.raises(LoadTestError, match="URL"):
        check_loopback("ftp://127.0.0.1/")


# --- micro-benchmarks --------------------------------------------------------------------------


def test_llama_bench_and_vision_micro(built):
    from cxrlite.bench.llama_bench import llama_bench
    from cxrlite.bench.vision_micro import bench_vision

    _, _, bundle = built
    result = llama_bench(bundle / "llm" / "llm-f32.gguf", [8, 16], gen=4, threads=[1], reps=1)
    assert [r["test"] for r in result["results"]] == ["pp8", "pp16", "tg4"]
    assert all(r["tokens_per_s"] > 0 and r["threads"] == 1 for r in result["results"])
    micro = bench_vision(bundle, ["onnx-fp32", "tensorrt"], [1, 2], runs=2, warmup=1, threads=1)
    assert set(micro["backends"]["onnx-fp32"]["batches"]) == {"1", "2"}
    assert micro["backends"]["onnx-fp32"]["batches"]["2"]["images_per_s"] > 0
    assert "tensorrt" in micro["skipped"]
