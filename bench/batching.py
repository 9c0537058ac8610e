"""Continuous batching side by side, in one run: cxrlite before a change (another checkout),
cxrlite now with `--parallel N`, and llama.cpp's own C++ `llama-server -np N`, on the same GGUF
with the same threads, at 1, 2, 4 and 8 clients, text-only and image requests.

    cxrlite bench batching --shape 1b --shape small --before-src ../cxrlite-before \\
        --llama-server "$(cxrlite bench llama-server)" --parallel 4 --threads 2 \\
        --image study.png --out batching/

Each workload (a bundle, or a random-weight `--shape` build) runs text-only requests on every
server, then image requests (each its own picture: `--distinct-images`) on the cxrlite servers
(llama-server needs an mmproj made by llama.cpp's converter, which reads published layouts, not
cxrlite's vision tower). One server at a time, all levels per start, greedy, a fixed
`--max-tokens`; llama-server with `--no-repack` (the weight layout cxrlite's runtime loads by
default: batch-invariant kernels) unless `--no-batch-invariant` is given to both. Output: batching.json (with the environment), batching.md and a terminal table:
tokens/s, requests/s, TTFT p50/p99, latency p50/p99 and errors per server and level, then the
verdicts: cxrlite's 4-client/1-client token-throughput scaling >= 0.9x llama-server's, its
tokens/s >= 0.9x llama-server's at every level, its p99 TTFT at the highest level no worse than
before, zero errors. Exit code 0 when every verdict holds, 1 when one does not, 2 on errors.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from cxrlite.bench.options import int_list
from cxrlite.bench.servers import (
    ServerCompareError,
    ServerSpec,
    bundle_llm,
    cxrlite_spec,
    free_port,
    llama_server_spec,
    managed_run,
    running_server,
)
from cxrlite.data.prompts import FINDINGS_PROMPT

logger = logging.getLogger(__name__)

SCHEMA = "cxrlite-batching/1"
SERVERS = ("before", "cxrlite", "llama-server")
# The verdicts' bounds (the issue's targets): scaling and throughput relative to llama-server.
MIN_SCALING_RATIO = 0.9
MIN_THROUGHPUT_RATIO = 0.9


def _spec(server: str, bundle: Path, threads: int, parallel: int, options: dict) -> ServerSpec:
    if server == "before":
        return cxrlite_spec(bundle, free_port(), threads, source=options["before_src"],
                            name="before")  # fmt: skip
    if server == "cxrlite":
        return cxrlite_spec(bundle, free_port(), threads, parallel=parallel,
                            batch_invariant=not options["repack"])  # fmt: skip
    llm = bundle_llm(bundle)
    return llama_server_spec(options["llama_server"], llm.gguf, free_port(), threads, llm.n_ctx,
                             parallel=parallel, no_repack=not options["repack"])  # fmt: skip


def _servers(kind: str, options: dict) -> list[str]:
    wanted = ["cxrlite"]
    if options.get("before_src"):
        wanted.insert(0, "before")
    if options.get("llama_server") and kind == "text":
        wanted.append("llama-server")
    return wanted


def run_batching(
    workloads: Sequence[tuple[str, Path]],
    out_dir: Path,
    *,
    concurrency: Sequence[int] = (1, 2, 4, 8),
    requests: int = 16,
    max_tokens: int = 32,
    threads: int = 2,
    parallel: int = 4,
    image: str | None = None,
    before_src: Path | None = None,
    llama_server: Path | None = None,
    prompt: str = FINDINGS_PROMPT,
    warmup: int = 2,
    start_timeout: float = 300.0,
    request_timeout: float = 600.0,
    kinds: Sequence[str] = ("text", "image"),
    batch_invariant: bool = True,
) -> dict[str, Any]:
    """Every workload x request kind x server (module docs); the rows and the verdicts."""
    from cxrlite.bench.loadtest import run_loadtest
    from cxrlite.bench.report import environment

    if not concurrency or min(concurrency) < 1 or requests < 1 or max_tokens < 1:
        raise ServerCompareError("concurrency levels, requests and max_tokens must be >= 1")
    env = environment()
    options = {"before_src": before_src, "llama_server": llama_server,
               "repack": not batch_invariant}  # fmt: skip
    runs = []
    for name, bundle in workloads:
        for kind in [k for k in kinds if k == "text" or image]:
            for server in _servers(kind, options):
                spec = _spec(server, bundle, threads, parallel, options)
                log = out_dir / f"{name}-{kind}-{server}.log"
                with running_server(spec, log, start_timeout):
                    result = run_loadtest(
                        spec.url, concurrency, requests=requests, prompt=prompt,
                        max_tokens=max_tokens, timeout=request_timeout, warmup=warmup,
                        image=image if kind == "image" else None,
                        distinct_images=kind == "image",
                    )  # fmt: skip
                for lv in result["levels"]:
                    logger.info("%s %s %s c=%d: %.1f tok/s, TTFT p99 %.0f ms", name, kind, server,
                                lv["concurrency"], lv["tokens_per_s"], lv["ttft_ms"]["p99"] or 0)  # fmt: skip
                runs.append({"workload": name, "kind": kind, "server": server,
                             "command": spec.command, "levels": result["levels"]})  # fmt: skip
    settings = {"concurrency": list(concurrency), "requests_per_level": requests,
                "max_tokens": max_tokens, "threads": threads, "parallel": parallel,
                "image": image, "prompt": prompt, "warmup": warmup, "kinds": list(kinds),
                "batch_invariant": batch_invariant,
                "before_src": str(before_src) if before_src else None,
                "llama_server": str(llama_server) if llama_server else None}  # fmt: skip
    verdicts = judge(runs, concurrency, max_tokens)
    return {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": env,
        "workloads": {name: str(bundle) for name, bundle in workloads},
        "settings": settings,
        "runs": runs,
        "verdicts": verdicts,
        "ok": all(v["ok"] for v in verdicts),
    }


def _level(runs: list[dict], workload: str, kind: str, server: str, c: int) -> dict | None:
    for run in runs:
        if (run["workload"], run["kind"], run["server"]) == (workload, kind, server):
            return next((lv for lv in run["levels"] if lv["concurrency"] == c), None)
    return None


def judge(runs: list[dict], concurrency: Sequence[int], max_tokens: int) -> list[dict]:
    """The issue's targets as verdicts, each with its measured values."""
    verdicts = []
    top = max(concurrency)
    for workload, kind in dict.fromkeys((r["workload"], r["kind"]) for r in runs):

        def tps(server: str, c: int, w: str = workload, k: str = kind) -> float | None:
            lv = _level(runs, w, k, server, c)
            return lv["tokens_per_s"] if lv and lv["ok"] else None

        where = f"{workload} {kind}"
        if {1, 4} <= set(concurrency) and tps("llama-server", 1):
            ours = (tps("cxrlite", 4) or 0) / (tps("cxrlite", 1) or float("inf"))
            theirs = tps("llama-server", 4) / tps("llama-server", 1)
            verdicts.append({"check": f"{where}: 4-client/1-client scaling vs llama-server's",
                             "value": round(ours / theirs, 3), "ours": round(ours, 3),
                             "theirs": round(theirs, 3),
                             "ok": ours >= MIN_SCALING_RATIO * theirs})  # fmt: skip
        for c in concurrency:
            if tps("llama-server", c):
                ratio = (tps("cxrlite", c) or 0) / tps("llama-server", c)
                verdicts.append({"check": f"{where}: tokens/s vs llama-server at {c} clients",
                                 "value": round(ratio, 3), "ok": ratio >= MIN_THROUGHPUT_RATIO})  # fmt: skip
        before, after = (_level(runs, workload, kind, s, top) for s in ("before", "cxrlite"))
        if before and after and before["ttft_ms"]["n"] and after["ttft_ms"]["n"]:
            b, a = before["ttft_ms"]["p99"], after["ttft_ms"]["p99"]
            verdicts.append({"check": f"{where}: p99 TTFT at {top} clients, after vs before",
                             "value": round(a / b, 3), "ours": a, "theirs": b, "ok": a <= b})  # fmt: skip
    errors = sum(sum(lv["errors"].values()) for r in runs for lv in r["levels"])
    short = [
        f"{r['workload']} {r['kind']} {r['server']}"
        for r in runs
        if any(lv["ok"] and lv["tokens_per_request"]["min"] < max_tokens for lv in r["levels"])
    ]
    verdicts.append({"check": "no errors", "value": errors, "ok": errors == 0})
    verdicts.append({"check": f"every request generated {max_tokens} tokens (equal work)",
                     "value": short or "all", "ok": not short})  # fmt: skip
    return verdicts


HEADER = ["workload", "conc", "server", "ok", "errors", "tok/s", "req/s", "TTFT p50/p99 ms",
          "latency p50/p99 ms"]  # fmt: skip


def _pair(stats: dict[str, Any]) -> str:
    return "-" if not stats["n"] else f"{stats['p50']:.0f}/{stats['p99']:.0f}"


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for run in result["runs"]:
        for lv in run["levels"]:
            rows.append([
                f"{run['workload']} {run['kind']}", str(lv["concurrency"]), run["server"],
                str(lv["ok"]), str(sum(lv["errors"].values())), f"{lv['tokens_per_s']:.1f}",
                f"{lv['requests_per_s']:.2f}", _pair(lv["ttft_ms"]), _pair(lv["latency_ms"]),
            ])  # fmt: skip
    return rows


def markdown(result: dict[str, Any]) -> str:
    env, s = result["environment"], result["settings"]
    lines = [
        "# Continuous batching: cxrlite before / after vs llama-server",
        "",
        f"- machine: {env['cpu']}, {env['logical_cores']} threads, {env['ram_gb']} GB RAM",
        f"- {s['requests_per_level']} requests per level after {s['warmup']} warm-up, "
        f"{s['max_tokens']} tokens, greedy, {s['threads']} thread(s) per server, "
        f"--parallel / -np {s['parallel']}; image requests: each its own picture",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "|".join("---" for _ in HEADER) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    lines += ["", "| verdict | value | ok |", "|---|---|---|"]
    lines += [f"| {v['check']} | {v['value']} | {'yes' if v['ok'] else 'NO'} |"
              for v in result["verdicts"]]  # fmt: skip
    return "\n".join(lines) + "\n"


# fmt: off
@click.command("batching")
@click.option("--bundle", "bundles", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A bundle to serve (repeatable); named after its folder.")
@click.option("--shape", "shapes", multiple=True,
              help="A random-weight shape (cxrlite bench --shape; repeatable), e.g. 1b, small.")
@click.option("--llm-variant", default="gguf-q4_k_m", show_default=True,
              help="The GGUF a --shape build holds.")
@click.option("--before-src", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="A checkout of cxrlite before the change (git worktree add).")
@click.option("--llama-server", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="llama.cpp's llama-server binary (cxrlite bench llama-server).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Also send image requests, each this picture with one pixel changed.")
@click.option("--kinds", type=click.Choice(["text", "image", "text,image"]), default="text,image",
              show_default=True, help="Request kinds to run (image ones need --image).")
@click.option("--batch-invariant/--no-batch-invariant", default=True, show_default=True,
              help="cxrlite's setting of the same name; llama-server gets --no-repack with it.")
@click.option("--parallel", type=click.IntRange(1), default=4, show_default=True,
              help="cxrlite's --parallel and llama-server's -np.")
@click.option("--threads", type=click.IntRange(1), default=2, show_default=True,
              help="Threads per server.")
@click.option("--concurrency", default="1,2,4,8", show_default=True, help="Client levels.")
@click.option("--requests", type=click.IntRange(1), default=16, show_default=True,
              help="Requests per level.")
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True)
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("batching"), show_default=True)
@click.pass_context
def batching_command(ctx: click.Context, bundles: tuple[Path, ...], shapes: tuple[str, ...],
                     llm_variant: str, before_src: Path | None, llama_server: Path | None,
                     image: str | None, kinds: str, batch_invariant: bool, parallel: int,
                     threads: int, concurrency: str,
                     requests: int, max_tokens: int, warmup: int, out: Path) -> None:
    """Continuous batching side by side: cxrlite before (--before-src), cxrlite now and
    llama-server, same GGUF and threads, 1-8 clients (module docs). Exit code 0 when every
    target holds, 1 when one does not, 2 on errors."""
    from cxrlite.bench.shapes import build_shape_bundle
    from cxrlite.fileio import atomic_write_text, write_json

    workloads = [(b.name, b) for b in bundles]
    for shape in shapes:
        click.echo(f"building/reusing the random-weight {shape} shape ...", err=True)
        workloads.append((shape, build_shape_bundle(shape, llm_variants=[llm_variant],
                                                    vision_variants=["onnx-fp32"])))
    if not workloads:
        raise click.UsageError("give --bundle or --shape")
    with managed_run():
        out.mkdir(parents=True, exist_ok=True)
        result = run_batching(
            workloads, out, concurrency=int_list(concurrency, "--concurrency"),
            requests=requests, max_tokens=max_tokens, threads=threads, parallel=parallel,
            image=image, before_src=before_src, llama_server=llama_server, warmup=warmup,
            kinds=kinds.split(","), batch_invariant=batch_invariant,
        )
        write_json(out / "batching.json", result)
        atomic_write_text(out / "batching.md", markdown(result))
        click.echo(markdown(result))
    ctx.exit(0 if result["ok"] else 1)
# fmt: on
