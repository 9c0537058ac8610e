"""cxrlite serve against llama-cpp-python's own server on the same GGUF, and a soak test.

    python -m cxrlite.bench.server_compare BUNDLE --concurrency 1,4,8 --requests 16 --out cmp/
    python -m cxrlite.bench.server_compare BUNDLE --mode soak --clients 8 --duration 120 \
        --image cxr.png --out soak/

`compare` (default) starts `cxrlite serve BUNDLE` and `python -m llama_cpp.server --model GGUF`
(the bundle's default LLM variant, or --llm-variant: the same file) one after the other, never
both at once, each on a free loopback port, and sends both the same streaming text requests
(greedy, same max_tokens) at each concurrency level through cxrlite.bench.loadtest. With
interleaving (default) each level runs on a fresh start of each server, A1 B1 A4 B4 ..., so a
drift in the machine's load hits both alike. Output: compare.json (with the environment),
compare.md and a terminal table: requests/s, tokens/s, tokens per request, TTFT p50/p90, ITL p50,
TPOT p50 (time per output token after the first: ITL shrinks to ~0 when a server sends tokens in
bursts), latency p50/p90 per server and level, and the cxrlite/llama_cpp ratios. Exit code: 0
when cxrlite is equal or better at every level (within --tolerance), 1 when not, 2 on errors.

`soak` starts cxrlite only, and C clients send a mix of image and text requests for D seconds
while the server's resident memory (children included) is sampled every second. Output:
soak.json (requests, errors by status, 5xx, alive at the end, RSS start/max/end and drift
against the target, the RSS series) and soak.png. Exit code 0 when it passed (alive, no errors,
no traceback in its log, RSS within the target), 1 when not, 2 on errors.

Servers always stop (SIGINT, then SIGKILL), on errors, Ctrl-C and SIGTERM too; their output goes to
<server>.log in --out (phantom requests only: no patient data reaches these logs).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxrlite.bench.servers import (
    RssSampler,
    ServerCompareError,
    bundle_llm,
    cxrlite_spec,
    free_port,
    llama_cpp_spec,
    running_server,
)
from cxrlite.data.prompts import FINDINGS_PROMPT

logger = logging.getLogger(__name__)

SCHEMA_COMPARE = "cxrlite-server-compare/1"
SCHEMA_SOAK = "cxrlite-soak/1"
# One thread each by default: this 2-core machine runs the client too, and llama.cpp's and
# onnxruntime's thread pools collapse when oversubscribed (spinning threads fight for cores).
DEFAULT_THREADS = 1
DEFAULT_PROMPT = FINDINGS_PROMPT
SERVERS = ("cxrlite", "llama_cpp")
RSS_TARGET = 0.10  # "resident memory flat within 10%"


# --- compare ---------------------------------------------------------------------------------


async def _probe(url: str, prompt: str, max_tokens: int, timeout: float) -> dict[str, Any]:
    """One untimed non-streaming request: the token counts the server itself reports."""
    import httpx

    from cxrlite.bench.loadtest import CHAT_PATH, build_payload, discover_model

    async with httpx.AsyncClient(timeout=timeout) as client:
        model = await discover_model(client, url, {})
        body = {**build_payload(model, prompt, None, max_tokens), "stream": False}
        body.pop("stream_options")
        response = await client.post(url + CHAT_PATH, json=body)
    if response.status_code != 200:
        return {"model": model, "status": response.status_code}
    data = response.json()
    usage = data.get("usage") or {}
    return {
        "model": model,
        "status": 200,
        "prompt_tokens": usage.get("prompt_tokens"),
        "completion_tokens": usage.get("completion_tokens"),
        "finish_reason": (data.get("choices") or [{}])[0].get("finish_reason"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare_level(ours: dict[str, Any], theirs: dict[str, Any], tolerance: float) -> dict[str, Any]:
    """cxrlite/llama_cpp ratios of one level; `equal_or_better` allows `tolerance` of noise
    (throughput ratios >= 1 - tolerance, latency ratios <= 1 + tolerance). ITL is reported but
    not judged: tokens that arrive in a burst give a near-zero ITL; TPOT judges decoding."""
    higher = {k: _ratio(ours[k], theirs[k]) for k in ("requests_per_s", "tokens_per_s")}
    lower = {
        f"{metric}_{q}": _ratio(ours[metric][q], theirs[metric][q])
        for metric, qs in (
            ("ttft_ms", ("p50", "p90")),
            ("tpot_ms", ("p50",)),
            ("latency_ms", ("p50", "p90")),
        )
        for q in qs
    }
    ok = (
        all(v is not None for v in [*higher.values(), *lower.values()])
        and all(v >= 1 - tolerance for v in higher.values())  # type: ignore[operator]
        and all(v <= 1 + tolerance for v in lower.values())  # type: ignore[operator]
    )
    itl = _ratio(ours["itl_ms"]["p50"], theirs["itl_ms"]["p50"])
    return {**higher, **lower, "itl_ms_p50": itl, "equal_or_better": ok}


def run_compare(
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    concurrency: Sequence[int] = (1, 4, 8),
    requests: int = 16,
    max_tokens: int = 64,
    prompt: str = DEFAULT_PROMPT,
    threads: int = DEFAULT_THREADS,
    llm_variant: str | None = None,
    warmup: int = 2,
    interleave: bool = True,
    tolerance: float = 0.05,
    start_timeout: float = 300.0,
    request_timeout: float = 300.0,
) -> dict[str, Any]:
    """Both servers on the same GGUF and text requests, one server at a time (module docs)."""
    from cxrlite.bench.loadtest import run_loadtest
    from cxrlite.bench.report import environment

    if not concurrency or min(concurrency) < 1 or requests < 1 or max_tokens < 1:
        raise ServerCompareError("concurrency levels, requests and max_tokens must be >= 1")
    env = environment()  # before the servers start: the load average is the machine's own
    llm = bundle_llm(bundle_dir, llm_variant)
    out = Path(out_dir)
    specs = {
        "cxrlite": lambda: cxrlite_spec(bundle_dir, free_port(), threads, llm_variant),
        "llama_cpp": lambda: llama_cpp_spec(llm.gguf, free_port(), threads, llm.n_ctx),
    }
    segments = [list(concurrency)] if not interleave else [[c] for c in concurrency]
    servers: dict[str, dict[str, Any]] = {}
    levels: dict[str, dict[int, dict[str, Any]]] = {name: {} for name in SERVERS}
    for segment in segments:
        for name in SERVERS:
            spec = specs[name]()
            with running_server(spec, out / f"{name}.log", start_timeout) as process:
                info = servers.setdefault(name, {"command": spec.command, "exit_codes": []})
                if "probe" not in info:
                    info["probe"] = asyncio.run(
                        _probe(spec.url, prompt, max_tokens, request_timeout)
                    )
                result = run_loadtest(
                    spec.url, segment, requests=requests, prompt=prompt, max_tokens=max_tokens,
                    timeout=request_timeout, warmup=warmup, model=info["probe"]["model"],
                )  # fmt: skip
                for lv in result["levels"]:
                    levels[name][lv["concurrency"]] = lv
                    logger.info("%s c=%d: %.2f req/s, %.1f tok/s", name, lv["concurrency"],
                                lv["requests_per_s"], lv["tokens_per_s"])  # fmt: skip
            info["exit_codes"].append(process.returncode)
    rows = [
        {"concurrency": c, **{n: levels[n][c] for n in SERVERS},
         "ratio": compare_level(levels["cxrlite"][c], levels["llama_cpp"][c], tolerance)}
        for c in concurrency
    ]  # fmt: skip
    # Neither server takes the other's "don't stop at EOS" option (cxrlite has none, llama_cpp
    # has min_tokens), so equal work needs a prompt and max_tokens that both generate in full.
    fewest = {
        n: min((r[n]["tokens_per_request"]["min"] for r in rows if r[n]["ok"]), default=0)
        for n in SERVERS
    }
    fixed = all(
        r[n]["tokens_per_request"]["max"] == max_tokens == fewest[n] for r in rows for n in SERVERS
    )
    notes = [
        f"{n} generated as few as {fewest[n]:.0f} of the {max_tokens} tokens (EOS): pass "
        f"--max-tokens {min(fewest.values()):.0f} or less, or a prompt that generates longer; "
        "without equal work there is no verdict"
        for n in SERVERS
        if fewest[n] != max_tokens
    ]
    errors = {n: sum(sum(r[n]["errors"].values()) for r in rows) for n in SERVERS}
    settings = {"concurrency": list(concurrency), "requests_per_level": requests,
                "max_tokens": max_tokens, "prompt": prompt, "temperature": 0.0, "threads": threads,
                "warmup": warmup, "interleave": interleave, "tolerance": tolerance}  # fmt: skip
    return {
        "schema": SCHEMA_COMPARE,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": env,
        "bundle": {
            "path": str(bundle_dir),
            "llm_variant": llm.variant,
            "gguf": str(llm.gguf),
            "n_ctx": llm.n_ctx,
        },
        "settings": settings,
        "servers": servers,
        "levels": rows,
        "fixed_length": fixed,
        "errors": errors,
        "equal_or_better": fixed
        and not any(errors.values())
        and all(r["ratio"]["equal_or_better"] for r in rows),
        "notes": notes,
    }


def _two(stats: dict[str, Any], a: str = "p50", b: str = "p90") -> str:
    return "-" if not stats["n"] else f"{stats[a]:.1f}/{stats[b]:.1f}"


def _one(stats: dict[str, Any]) -> str:
    return "-" if not stats["n"] else f"{stats['p50']:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


COMPARE_HEADER = ["conc", "server", "ok", "errors", "req/s", "tok/s", "tok/req",
                  "TTFT p50/p90 ms", "ITL p50 ms", "TPOT p50 ms", "latency p50/p90 ms"]  # fmt: skip


def compare_rows(result: dict[str, Any]) -> list[list[str]]:
    """Table rows: each server per level, then the cxrlite/llama_cpp ratio row."""
    rows = []
    for row in result["levels"]:
        c = str(row["concurrency"])
        for name in SERVERS:
            lv = row[name]
            tpr = lv["tokens_per_request"]
            rows.append([
                c, name, str(lv["ok"]), ", ".join(f"{k}: {v}" for k, v in lv["errors"].items()) or "-",
                f"{lv['requests_per_s']:.2f}", f"{lv['tokens_per_s']:.1f}",
                "-" if not tpr["n"] else f"{tpr['min']:.0f}-{tpr['max']:.0f}", _two(lv["ttft_ms"]),
                _one(lv["itl_ms"]), _one(lv["tpot_ms"]), _two(lv["latency_ms"]),
            ])  # fmt: skip
        r = row["ratio"]
        rows.append([
            c, "ratio" + (" ok" if r["equal_or_better"] else " WORSE"), "", "",
            _x(r["requests_per_s"]), _x(r["tokens_per_s"]), "",
            f"{_x(r['ttft_ms_p50'])}/{_x(r['ttft_ms_p90'])}", _x(r["itl_ms_p50"]), _x(r["tpot_ms_p50"]),
            f"{_x(r['latency_ms_p50'])}/{_x(r['latency_ms_p90'])}",
        ])  # fmt: skip
    return rows


def compare_markdown(result: dict[str, Any]) -> str:
    from cxrlite.bench.report import busy_note

    env, s = result["environment"], result["settings"]
    probes = "; ".join(
        f"{n}: {i['probe'].get('prompt_tokens')} prompt + {i['probe'].get('completion_tokens')} "
        f"completion tokens ({i['probe'].get('finish_reason')})"
        for n, i in result["servers"].items()
    )
    lines = [
        f"# cxrlite serve vs llama_cpp.server: {result['bundle']['llm_variant']}",
        "",
        f"- machine: {env['cpu']}, {env['logical_cores']} threads, {env['ram_gb']} GB RAM",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}",
        f"- {s['requests_per_level']} requests per level after {s['warmup']} warm-up, "
        f"{s['max_tokens']} tokens, greedy, {s['threads']} thread(s), n_ctx "
        f"{result['bundle']['n_ctx']}, {'interleaved' if s['interleave'] else 'sequential'}",
        f"- token counts the servers report: {probes}",
        f"- ratio = cxrlite / llama_cpp; verdict with {s['tolerance']:.0%} tolerance: "
        f"{'equal or better' if result['equal_or_better'] else 'NOT equal or better'}",
    ]
    lines += [f"- {note}" for note in result["notes"]]
    if busy_note(env):
        lines.append(f"- {busy_note(env)}")
    lines += ["", "| " + " | ".join(COMPARE_HEADER) + " |"]
    lines.append("|" + "|".join("---" for _ in COMPARE_HEADER) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in compare_rows(result)]
    return "\n".join(lines) + "\n"


# --- soak ------------------------------------------------------------------------------------


def phantom_png(index: int = 0) -> tuple[bytes, str]:
    """A phantom radiograph (synthetic: no patient) for soak runs without --image."""
    from cxrlite.imaging.write import png_bytes
    from cxrlite.phantoms.generator import make_phantom_study

    return png_bytes(make_phantom_study(index, 0, size=256)[1]), f"phantom-{index}.png"


async def _soak_load(
    url: str,
    payload_parts: list[tuple[bytes | None, str]],
    *,
    prompt: str,
    max_tokens: int,
    clients: int,
    duration: float,
    warmup_rounds: int,
    timeout: float,
    on_loaded: Callable[[], None],
) -> dict[str, Any]:
    import httpx

    from cxrlite.bench.loadtest import CHAT_PATH, build_payload, discover_model, run_level

    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = await discover_model(client, url, {})
        payloads = [
            build_payload(model, prompt, image, max_tokens, name) for image, name in payload_parts
        ]
        # Warm-up at the full concurrency, so that per-thread allocator arenas and caches exist
        # before the start-of-load RSS is taken: only growth under steady load counts as drift.
        warm_requests = max(clients, len(payloads)) * warmup_rounds
        warm = await run_level(client, url + CHAT_PATH, payloads, {}, clients, warm_requests, None)
        on_loaded()
        level = await run_level(
            client, url + CHAT_PATH, payloads, {}, clients, sys.maxsize, duration
        )
    return {"model": model, "warmup": warm, "load": level}


def run_soak(
    bundle_dir: str | Path,
    out_dir: str | Path,
    *,
    clients: int = 8,
    duration: float = 120.0,
    image: str | Path | None = None,
    distinct_images: int = 300,
    prompt: str = DEFAULT_PROMPT,
    max_tokens: int = 64,
    threads: int = DEFAULT_THREADS,
    llm_variant: str | None = None,
    interval: float = 1.0,
    warmup_rounds: int = 1,
    target: float = RSS_TARGET,
    start_timeout: float = 300.0,
    request_timeout: float = 300.0,
) -> dict[str, Any]:
    """`clients` clients, image and text requests in turn, for `duration` s against cxrlite.
    Without `image`, `distinct_images` phantoms in turn: more than the server's embedding cache
    holds (256 by default), so the soak also runs decoding, the vision tower and cache eviction,
    not just cache hits. Warm-up sends each of them once, so a full cache is the baseline."""
    from cxrlite.bench.report import environment

    if clients < 1 or duration <= 0 or max_tokens < 1 or interval <= 0:
        raise ServerCompareError("clients, duration, max_tokens and interval must be positive")
    if image is not None:
        try:
            picture = (Path(image).read_bytes(), Path(image).name)
        except OSError as e:
            raise ServerCompareError(
                f"{image}: cannot read the image ({e.strerror or e})"
            ) from None
        pictures = [picture]
    else:
        if distinct_images < 1:
            raise ServerCompareError("distinct_images must be >= 1")
        pictures = [phantom_png(i) for i in range(distinct_images)]
    env = environment()
    spec = cxrlite_spec(bundle_dir, free_port(), threads, llm_variant)
    log_path = Path(out_dir) / "cxrlite.log"
    log_offset = log_path.stat().st_size if log_path.exists() else 0  # the log is appended to
    with running_server(spec, log_path, start_timeout) as process:
        sampler = RssSampler(process.pid, interval)
        try:
            load = asyncio.run(
                _soak_load(
                    spec.url, [p for pic in pictures for p in (pic, (None, ""))], prompt=prompt, max_tokens=max_tokens,
                    clients=clients, duration=duration, warmup_rounds=warmup_rounds,
                    timeout=request_timeout, on_loaded=sampler.start,
                )
            )  # fmt: skip
        finally:
            sampler.stop()
        alive = process.poll() is None
    with open(log_path, "rb") as log:
        log.seek(log_offset)
        tracebacks = log.read().count(b"Traceback (most recent call last)")
    samples = sampler.samples
    mb = [round(rss / 2**20, 2) for _, rss in samples]
    start, peak, end = (mb[0], max(mb), mb[-1]) if mb else (None, None, None)
    level = load["load"]
    errors_5xx = sum(n for status, n in level["errors"].items() if status.startswith("5"))
    rss = {
        "start_mb": start,
        "max_mb": peak,
        "end_mb": end,
        "end_drift": end / start - 1 if start else None,
        "max_drift": peak / start - 1 if start else None,
        "target": target,
    }
    # Flat: neither grown nor shrunk by more than `target` at the end, never above it meanwhile.
    rss["flat"] = (
        start is not None and abs(rss["end_drift"]) <= target and rss["max_drift"] <= target
    )
    settings = {"clients": clients, "duration_s": duration, "images": len(pictures),
                "max_tokens": max_tokens, "threads": threads, "llm_variant": llm_variant,
                "interval_s": interval, "warmup_rounds": warmup_rounds}  # fmt: skip
    return {
        "schema": SCHEMA_SOAK,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": env,
        "bundle": str(bundle_dir),
        "settings": settings,
        "server": {
            "command": spec.command,
            "pid": process.pid,
            "alive_at_end": alive,
            "exit_code": process.returncode,
            "log_tracebacks": tracebacks,
        },
        "requests": level["requests"],
        "ok": level["ok"],
        "errors": level["errors"],
        "errors_5xx": errors_5xx,
        "warmup_errors": load["warmup"]["errors"],
        "load": level,
        "rss": rss,
        "rss_samples": [[t, m] for (t, _), m in zip(samples, mb, strict=True)],
        "passed": alive and not tracebacks and not level["errors"] and rss["flat"],
    }


def plot_rss(result: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cxrlite.fileio import atomic_open

    fig, axis = plt.subplots(figsize=(8, 4))
    t = [s[0] for s in result["rss_samples"]]
    axis.plot(t, [s[1] for s in result["rss_samples"]], "-", label="RSS (server + children)")
    start, target = result["rss"]["start_mb"], result["rss"]["target"]
    if start:
        axis.axhline(start, color="C2", linestyle="--", label="start of load")
        band = (start * (1 - target), start * (1 + target))
        axis.axhspan(*band, color="C2", alpha=0.1, label=f"target: within {target:.0%}")
    axis.set_xlabel("seconds since start of load")
    axis.set_ylabel("MiB")
    s = result["settings"]
    axis.set_title(f"cxrlite serve, {s['clients']} clients, {s['duration_s']:.0f} s")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


# --- command line ----------------------------------------------------------------------------


def _print_compare(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="cxrlite serve vs llama_cpp.server (ratio = cxrlite / llama_cpp)",
        title_justify="left",
    )
    for column in COMPARE_HEADER:
        table.add_column(column, justify="right")
    for row in compare_rows(result):
        table.add_row(*row)
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for name, info in result["servers"].items():
        console.print(f"{name} reports: {info['probe']}")
    for note in result["notes"]:
        console.print(f"[yellow]note: {note}[/]")


def _print_soak(result: dict[str, Any]) -> None:
    from rich.console import Console

    r, server = result["rss"], result["server"]
    lines = [
        f"soak: {result['requests']} requests, {result['ok']} ok, errors {result['errors'] or '-'}"
        f" (5xx: {result['errors_5xx']}), alive at end: {server['alive_at_end']}, tracebacks in "
        f"the log: {server['log_tracebacks']}"
    ]
    if r["start_mb"] is not None:
        lines.append(
            f"RSS MiB start {r['start_mb']:.1f}, max {r['max_mb']:.1f}, end {r['end_mb']:.1f}: "
            f"drift end {r['end_drift']:+.1%}, max {r['max_drift']:+.1%} "
            f"(target {r['target']:.0%})"
        )
    lines.append("PASS" if result["passed"] else "FAIL")
    Console().print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="a cxrlite bundle folder")
    parser.add_argument("--mode", choices=("compare", "soak"), default="compare")
    parser.add_argument("--out", default="server-compare", help="folder for JSON, tables, logs")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="per server")
    parser.add_argument("--llm-variant", default=None, help="a GGUF variant (default: bundle's)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds to be ready")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    compare = parser.add_argument_group("compare")
    compare.add_argument("--concurrency", default="1,4,8", help="comma-separated levels")
    compare.add_argument("--requests", type=int, default=16, help="requests per level")
    compare.add_argument("--warmup", type=int, default=2, help="untimed requests per start")
    compare.add_argument("--no-interleave", action="store_true", help="start each server once")
    compare.add_argument("--tolerance", type=float, default=0.05, help="noise allowed in ratios")
    soak = parser.add_argument_group("soak")
    soak.add_argument("--clients", type=int, default=8)
    soak.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    soak.add_argument("--image", default=None, help="PNG sent in every other request")
    soak.add_argument(
        "--distinct-images",
        type=int,
        default=300,
        help="without --image: this many phantoms in turn (> the server's cache)",
    )
    soak.add_argument("--interval", type=float, default=1.0, help="seconds between RSS samples")
    soak.add_argument("--target", type=float, default=RSS_TARGET, help="allowed RSS drift")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "cxrlite.bench.loadtest"):  # a line per request / a dict per level
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from cxrlite.fileio import atomic_write_text, write_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = {"max_tokens": args.max_tokens, "prompt": args.prompt, "threads": args.threads,
              "llm_variant": args.llm_variant, "start_timeout": args.start_timeout,
              "request_timeout": args.request_timeout}  # fmt: skip
    try:
        if args.mode == "compare":
            try:
                levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
            except ValueError:
                parser.error(
                    f"--concurrency must be comma-separated integers: {args.concurrency!r}"
                )
            result = run_compare(
                args.bundle, out, concurrency=levels, requests=args.requests, warmup=args.warmup,
                interleave=not args.no_interleave, tolerance=args.tolerance, **common,
            )  # fmt: skip
            write_json(out / "compare.json", result)
            atomic_write_text(out / "compare.md", compare_markdown(result))
            _print_compare(result)
            return 0 if result["equal_or_better"] else 1
        result = run_soak(
            args.bundle, out, clients=args.clients, duration=args.duration, image=args.image,
            distinct_images=args.distinct_images, interval=args.interval, target=args.target, **common,
        )  # fmt: skip
        write_json(out / "soak.json", result)
        plot_rss(result, out / "soak.png")
        _print_soak(result)
        return 0 if result["passed"] else 1
    except ServerCompareError as e:
        parser.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    raise SystemExit(main())
