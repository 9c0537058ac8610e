"""A soak test of `cxrlite serve`: steady load for a while, watching errors and memory.

    cxrlite bench soak BUNDLE --clients 8 --duration 120 --image cxr.png --out soak/
    python -m cxrlite.bench.soak BUNDLE --duration 120                    # the same

It starts cxrlite serve alone, and C clients send a mix of image and text requests for D seconds
while the server's resident memory (children included) is sampled every second. Output:
soak.json (requests, errors by status, 5xx, alive at the end, RSS start/max/end and drift
against the target, the RSS series) and soak.png. Exit code 0 when it passed (alive, no errors,
no traceback in its log, RSS within the target), 1 when not, 2 on errors.

The server always stops (SIGINT, then SIGKILL), on errors, Ctrl-C and SIGTERM too; its output
goes to cxrlite.log in --out (phantom requests only: no patient data reaches the log).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from cxrlite.bench.options import run_subcommand
from cxrlite.bench.servers import (
    DEFAULT_THREADS,
    RssSampler,
    ServerCompareError,
    cxrlite_spec,
    free_port,
    managed_run,
    running_server,
    server_options,
)
from cxrlite.data.prompts import FINDINGS_PROMPT

SCHEMA_SOAK = "cxrlite-soak/1"
RSS_TARGET = 0.10  # "resident memory flat within 10%"


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
    prompt: str = FINDINGS_PROMPT,
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
        parts = [part for pic in pictures for part in (pic, (None, ""))]  # image, text, ...
        try:
            load = asyncio.run(
                _soak_load(
                    spec.url, parts, prompt=prompt, max_tokens=max_tokens, clients=clients,
                    duration=duration, warmup_rounds=warmup_rounds, timeout=request_timeout,
                    on_loaded=sampler.start,
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


def print_soak(result: dict[str, Any]) -> None:
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


# fmt: off
@click.command("soak")
@server_options("soak")
@click.option("--clients", type=click.IntRange(1), default=8, show_default=True)
@click.option("--duration", type=float, default=120.0, show_default=True, help="Seconds of load.")
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="PNG sent in every other request.")
@click.option("--distinct-images", type=click.IntRange(1), default=300, show_default=True,
              help="Without --image: this many phantoms in turn (more than the server's cache).")
@click.option("--interval", type=float, default=1.0, show_default=True,
              help="Seconds between RSS samples.")
@click.option("--target", type=float, default=RSS_TARGET, show_default=True,
              help="Allowed RSS drift.")
@click.pass_context
def soak_command(ctx: click.Context, bundle: Path, out: Path, threads: int, llm_variant: str | None,
                 prompt: str, max_tokens: int, start_timeout: float, request_timeout: float,
                 clients: int, duration: float, image: str | None, distinct_images: int,
                 interval: float, target: float) -> None:
    """Soak test of cxrlite serve: clients send image and text requests for a while; errors and
    resident memory drift. Exit code 0 passed, 1 failed, 2 error."""
    from cxrlite.fileio import write_json

    with managed_run():
        out.mkdir(parents=True, exist_ok=True)
        result = run_soak(
            bundle, out, clients=clients, duration=duration, image=image,
            distinct_images=distinct_images, interval=interval, target=target,
            max_tokens=max_tokens, prompt=prompt, threads=threads, llm_variant=llm_variant,
            start_timeout=start_timeout, request_timeout=request_timeout,
        )
        write_json(out / "soak.json", result)
        plot_rss(result, out / "soak.png")
        print_soak(result)
    ctx.exit(0 if result["passed"] else 1)
# fmt: on


if __name__ == "__main__":
    run_subcommand("soak")
