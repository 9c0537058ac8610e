"""`cxrlite bench batching` (cxrlite.bench.batching) and `cxrlite bench llama-server`: the
before/after/peer runs on a tiny bundle, the verdicts' arithmetic, the build cache."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
from runtime_testkit import random_pixels, runtime_bundle

from cxrlite.bench.batching import judge, markdown, run_batching
from cxrlite.bench.llama_server import LlamaServerBuildError, build_llama_server, installed_version

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return runtime_bundle(tmp_path_factory)[2]


def test_before_and_after_run_the_same_requests(bundle, tmp_path):
    from cxrlite.imaging.write import png_bytes

    image = tmp_path / "study.png"
    pixels = random_pixels(5, size=64)[0]
    image.write_bytes(png_bytes(((pixels - pixels.min()) / np.ptp(pixels) * 255).astype("uint8")))
    result = run_batching(
        [("tiny", bundle)], tmp_path, concurrency=[1, 2], requests=2, max_tokens=4, warmup=0,
        threads=1, parallel=2, image=str(image), before_src=REPO,
    )  # fmt: skip
    runs = {(r["kind"], r["server"]): r for r in result["runs"]}
    assert set(runs) == {(k, s) for k in ("text", "image") for s in ("before", "cxrlite")}
    for run in runs.values():
        assert [lv["concurrency"] for lv in run["levels"]] == [1, 2]
        assert all(lv["ok"] == 2 and lv["errors"] == {} for lv in run["levels"])
    assert "--parallel" in runs[("text", "cxrlite")]["command"]
    assert "--parallel" not in runs[("text", "before")]["command"]
    checks = {v["check"]: v for v in result["verdicts"]}
    assert checks["no errors"]["ok"] and checks["no errors"]["value"] == 0
    assert "tiny text: p99 TTFT at 2 clients, after vs before" in checks
    assert not any("llama-server" in c for c in checks)  # no peer given: no peer verdicts
    text = markdown(result)
    assert "| tiny text | 2 | cxrlite | 2 |" in text and "| tiny image | 1 | before | 2 |" in text
    assert json.loads(json.dumps(result))["schema"] == "cxrlite-batching/1"
    assert (tmp_path / "tiny-text-before.log").read_text().count("\n=== ") == 1


def level(c: int, tps: float, ttft_p99: float = 100.0, errors: dict | None = None) -> dict:
    stats = {"n": 4, "p50": ttft_p99 / 2, "p99": ttft_p99}
    return {"concurrency": c, "ok": 4, "errors": errors or {}, "tokens_per_s": tps,
            "tokens_per_request": {"min": 8, "max": 8}, "ttft_ms": stats}  # fmt: skip


def test_verdicts_hold_the_issue_targets():
    def run(server, tps, ttft=(100.0, 100.0)):
        return {"workload": "1b", "kind": "text", "server": server,
                "levels": [level(1, tps[0], ttft[0]), level(4, tps[1], ttft[1])]}  # fmt: skip

    good = [run("before", (10, 10), (100, 900)), run("cxrlite", (10, 12.5), (100, 800)),
            run("llama-server", (10, 13.5))]  # fmt: skip
    checks = {v["check"]: v for v in judge(good, [1, 4], 8)}
    scaling = checks["1b text: 4-client/1-client scaling vs llama-server's"]
    assert scaling["ok"] and scaling["value"] == pytest.approx(1.25 / 1.35, abs=1e-3)
    assert checks["1b text: tokens/s vs llama-server at 4 clients"]["value"] == pytest.approx(
        12.5 / 13.5, abs=1e-3
    )
    assert checks["1b text: p99 TTFT at 4 clients, after vs before"]["ok"]
    assert all(v["ok"] for v in checks.values())
    bad = [run("before", (10, 10), (100, 700)), run("cxrlite", (10, 11), (100, 800)),
           run("llama-server", (10, 13.5))]  # fmt: skip
    bad[1]["levels"][0]["errors"] = {"503": 1}
    failed = {v["check"] for v in judge(bad, [1, 4], 8) if not v["ok"]}
    assert failed == {
        "1b text: 4-client/1-client scaling vs llama-server's",  # 1.1 < 0.9 x 1.35
        "1b text: tokens/s vs llama-server at 4 clients",  # 11 / 13.5 < 0.9
        "1b text: p99 TTFT at 4 clients, after vs before",
        "no errors",
    }


def test_llama_server_build_is_cached_and_reports_a_bad_source(tmp_path):
    cached = tmp_path / installed_version() / "llama-server"
    with pytest.raises(LlamaServerBuildError, match="no llama.cpp source tree"):
        build_llama_server(source=tmp_path, cache_dir=tmp_path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text("#!/bin/sh\n")
    cached.chmod(cached.stat().st_mode | stat.S_IXUSR)
    assert build_llama_server(cache_dir=tmp_path) == cached  # nothing is built again
