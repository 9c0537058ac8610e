"""Concurrency sweep against a running OpenAI-compatible chat server (cxrlite serve, llama.cpp's).

    cxrlite bench load --url http://127.0.0.1:8000 --concurrency 1,2,4,8 \
        --requests 32 --image cxr.png --max-tokens 64 --api-key "$KEY" --out loadtest/
    cxrlite bench load --url http://127.0.0.1:8001 --concurrency 1,4   # text only, e.g.
        # against `python -m llama_cpp.server --model llm.gguf --port 8001`
    python -m cxrlite.bench.loadtest --url ...                         # the same

For each concurrency level, that many clients send streaming /v1/chat/completions requests back
to back until `--requests` have been sent or `--duration` seconds have passed. Every request is
timed from sending to: the first content token (TTFT), each next one (inter-token latency, ITL)
and the end of the stream (latency). Per level: requests/s and generated tokens/s over the
level's wall time, p50/p90/p99 of TTFT, ITL and latency, and errors by HTTP status (or
"timeout" / "connection"). Tokens are the server's `usage.completion_tokens` when it sends usage
(stream_options.include_usage), else the number of content chunks. Output: loadtest.json and
throughput.png (throughput and TTFT against concurrency) in `--out`.

Only loopback addresses are contacted unless `--allow-remote`: a load test aimed at the wrong
host is a denial-of-service attack.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import logging
import mimetypes
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click

from cxrlite.bench.options import int_list, run_subcommand
from cxrlite.bench.report import summarize
from cxrlite.data.prompts import FINDINGS_PROMPT
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

SCHEMA = "cxrlite-loadtest/1"
CHAT_PATH = "/v1/chat/completions"


class LoadTestError(CxrliteError, ValueError):
    """The load test cannot run as asked (remote host without --allow-remote, bad image...)."""


def check_loopback(url: str, allow_remote: bool = False) -> None:
    """Refuse a URL whose host resolves to any non-loopback address, unless allowed."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise LoadTestError(f"{url!r}: expected an http(s)://host:port URL")
    if allow_remote:
        return
    try:
        infos = socket.getaddrinfo(parsed.hostname, parsed.port or 80, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LoadTestError(f"{parsed.hostname}: cannot resolve ({e})") from None
    addresses = {info[4][0] for info in infos}
    remote = sorted(a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback)
    if remote:
        raise LoadTestError(
            f"{parsed.hostname} resolves to non-loopback {remote}; pass --allow-remote to "
            "load-test another machine (only one you are responsible for)"
        )


def image_variant(image: bytes, index: int) -> bytes:
    """The image as a PNG with one pixel changed by `index`: another picture to every cache (an
    embedding cache keyed on pixels, a prompt cache keyed on image hashes), the same cost."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(image)) as opened:
        picture = opened.convert("L")
    width = picture.width
    x, y = index % width, (index // width) % picture.height
    picture.putpixel((x, y), (picture.getpixel((x, y)) + 1 + index % 7) % 256)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def build_payload(
    model: str, prompt: str, image: bytes | None, max_tokens: int, image_name: str = "image.png"
) -> dict[str, Any]:
    """A streaming chat request; the image goes in as a base64 data URL (OpenAI's format)."""
    content: Any = prompt
    if image is not None:
        mime = mimetypes.guess_type(image_name)[0] or "application/octet-stream"
        url = f"data:{mime};base64,{base64.b64encode(image).decode()}"
        content = [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": url}},
        ]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


@dataclass
class RequestResult:
    ok: bool
    status: str  # "200", "503", "timeout", "connection", "protocol"
    latency_ms: float
    ttft_ms: float | None = None
    itl_ms: list[float] = field(default_factory=list)
    tokens: int = 0


def _content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    return delta.get("content") or choices[0].get("text") or ""


async def one_request(
    client: Any, url: str, payload: dict[str, Any], headers: dict[str, str]
) -> RequestResult:
    """Send one streaming request and time its tokens."""
    import httpx

    start = time.perf_counter()
    stamps: list[float] = []
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(False, str(response.status_code), _since(start))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if _content(chunk):
                    stamps.append(time.perf_counter())
                usage = chunk.get("usage") or {}
                usage_tokens = usage.get("completion_tokens", usage_tokens)
    except httpx.TimeoutException:
        return RequestResult(False, "timeout", _since(start))
    except (httpx.TransportError, OSError):
        return RequestResult(False, "connection", _since(start))
    except ValueError:  # a chunk that is not JSON
        return RequestResult(False, "protocol", _since(start))
    itl = [1000.0 * (b - a) for a, b in zip(stamps, stamps[1:], strict=False)]
    return RequestResult(
        ok=True,
        status="200",
        latency_ms=_since(start),
        ttft_ms=1000.0 * (stamps[0] - start) if stamps else None,
        itl_ms=itl,
        tokens=int(usage_tokens) if usage_tokens is not None else len(stamps),
    )


def _since(start: float) -> float:
    return 1000.0 * (time.perf_counter() - start)


def summarize_level(
    concurrency: int, results: list[RequestResult], wall_s: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "ok": len(ok),
        "errors": dict(sorted(Counter(r.status for r in results if not r.ok).items())),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "tokens_per_s": tokens / wall_s if wall_s > 0 else 0.0,
        "tokens": tokens,
        # Per request: shows whether every request generated max_tokens (a fixed output length)
        "tokens_per_request": summarize([r.tokens for r in ok]),
        "ttft_ms": summarize([r.ttft_ms for r in ok if r.ttft_ms is not None]),
        "itl_ms": summarize([x for r in ok for x in r.itl_ms]),
        # Time per output token after the first, per request: unlike ITL, not fooled by a server
        # that sends tokens in bursts (several SSE events arriving in one read).
        "tpot_ms": summarize(
            [
                (r.latency_ms - r.ttft_ms) / (r.tokens - 1)
                for r in ok
                if r.ttft_ms is not None and r.tokens > 1
            ]
        ),
        "latency_ms": summarize([r.latency_ms for r in ok]),
    }


async def run_level(
    client: Any,
    url: str,
    payload: dict[str, Any] | Sequence[dict[str, Any]],
    headers: dict[str, str],
    concurrency: int,
    requests: int,
    duration: float | None,
) -> dict[str, Any]:
    """`concurrency` clients, back to back, until `requests` are sent or `duration` s pass.
    A list of payloads is sent in turn (request i sends payloads[i % len]): a mixed load."""
    payloads = [payload] if isinstance(payload, dict) else list(payload)
    if not payloads:
        raise LoadTestError("run_level needs at least one payload")
    results: list[RequestResult] = []
    sent = 0
    start = time.perf_counter()
    deadline = start + duration if duration else None

    async def client_loop() -> None:
        nonlocal sent
        while sent < requests and (deadline is None or time.perf_counter() < deadline):
            index = sent
            sent += 1  # no await between the check and the increment: no overshoot
            body = payloads[index % len(payloads)]
            results.append(await one_request(client, url, body, headers))

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return summarize_level(concurrency, results, time.perf_counter() - start)


async def discover_model(client: Any, base: str, headers: dict[str, str]) -> str:
    """The first model id the server lists at /v1/models, else "default"."""
    try:
        response = await client.get(base + "/v1/models", headers=headers)
        data = response.json().get("data") or []
        if response.status_code == 200 and data:
            return str(data[0]["id"])
    except Exception:  # any failure here just means "use a generic name"
        logger.debug("model discovery failed", exc_info=True)
    return "default"


async def run_loadtest_async(
    url: str,
    concurrency: Sequence[int] = (1, 2, 4, 8),
    *,
    requests: int = 16,
    duration: float | None = None,
    image: str | None = None,
    prompt: str = FINDINGS_PROMPT,
    max_tokens: int = 64,
    api_key: str | None = None,
    model: str | None = None,
    timeout: float = 300.0,
    warmup: int = 1,
    allow_remote: bool = False,
    distinct_images: bool = False,
) -> dict[str, Any]:
    import httpx

    check_loopback(url, allow_remote)
    if not concurrency or min(concurrency) < 1 or requests < 1:
        raise LoadTestError("concurrency levels and --requests must be >= 1")
    image_bytes = None
    if image is not None:
        try:
            image_bytes = Path(image).read_bytes()
        except OSError as e:
            raise LoadTestError(f"{image}: cannot read the image ({e.strerror or e})") from None
    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=max(concurrency) + 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = model or await discover_model(client, base, headers)
        name = Path(image).name if image else "image.png"
        payload = build_payload(model, prompt, image_bytes, max_tokens, name)
        fresh = iter(range(1, 1 << 30))  # distinct_images: each request its own picture

        def payloads(n: int) -> list[dict[str, Any]]:
            if not (distinct_images and image_bytes):
                return [payload]
            return [
                build_payload(
                    model, prompt, image_variant(image_bytes, next(fresh)), max_tokens, "image.png"
                )  # fmt: skip
                for _ in range(n)
            ]

        for body in payloads(warmup)[:warmup]:
            await one_request(client, base + CHAT_PATH, body, headers)
        levels = []
        for level in concurrency:
            summary = await run_level(
                client, base + CHAT_PATH, payloads(requests), headers, level, requests, duration
            )
            logger.info("concurrency %d: %s", level, summary)
            levels.append(summary)
    return {
        "schema": SCHEMA,
        "url": base,
        "model": model,
        "image": Path(image).name if image else None,
        "distinct_images": bool(distinct_images and image_bytes),
        "max_tokens": max_tokens,
        "requests_per_level": requests,
        "duration_s": duration,
        "levels": levels,
    }


def run_loadtest(
    url: str, concurrency: Sequence[int] = (1, 2, 4, 8), **kwargs: Any
) -> dict[str, Any]:
    """Synchronous wrapper of `run_loadtest_async` (see the module docstring)."""
    return asyncio.run(run_loadtest_async(url, concurrency, **kwargs))


def print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"load test {result['url']} ({result['model']})", title_justify="left")
    for column in ("conc", "ok", "errors", "req/s", "tok/s", "TTFT p50/p99 ms", "ITL p50/p99 ms",
                   "latency p50/p99 ms"):  # fmt: skip
        table.add_column(column, justify="right")
    for lv in result["levels"]:

        def two(stats: dict[str, Any]) -> str:
            return "-" if not stats["n"] else f"{stats['p50']:.1f}/{stats['p99']:.1f}"

        table.add_row(
            str(lv["concurrency"]), str(lv["ok"]),
            json.dumps(lv["errors"]) if lv["errors"] else "-", f"{lv['requests_per_s']:.2f}",
            f"{lv['tokens_per_s']:.1f}", two(lv["ttft_ms"]), two(lv["itl_ms"]),
            two(lv["latency_ms"]),
        )  # fmt: skip
    Console(width=max(Console().width, 120)).print(table)


# fmt: off
@click.command("load")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="The server.")
@click.option("--concurrency", default="1,2,4,8", show_default=True, help="Comma-separated levels.")
@click.option("--requests", type=click.IntRange(1), default=16, show_default=True,
              help="Requests per level.")
@click.option("--duration", type=float, default=None, help="At most this many seconds per level.")
@click.option("--image", type=click.Path(dir_okay=False), default=None,
              help="Radiograph to send [default: text only].")
@click.option("--prompt", default=FINDINGS_PROMPT, help="[default: the findings prompt]")
@click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--api-key", default=None, help="Bearer token, if the server wants one.")
@click.option("--model", default=None, help="Model id [default: the first of /v1/models].")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds per request.")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="Untimed requests first.")
@click.option("--allow-remote", is_flag=True, help="Allow a non-loopback host.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("loadtest"),
              show_default=True, help="Folder for loadtest.json + throughput.png.")
def load_command(url: str, concurrency: str, requests: int, duration: float | None,
                 image: str | None, prompt: str, max_tokens: int, api_key: str | None,
                 model: str | None, timeout: float, warmup: int, allow_remote: bool,
                 out: Path) -> None:
    """Concurrency sweep against a running OpenAI-compatible chat server (cxrlite serve,
    llama.cpp's): requests/s, tokens/s, TTFT, ITL and latency per level."""
    levels = int_list(concurrency, "--concurrency")
    result = run_loadtest(
        url, levels, requests=requests, duration=duration, image=image, prompt=prompt,
        max_tokens=max_tokens, api_key=api_key, model=model, timeout=timeout, warmup=warmup,
        allow_remote=allow_remote,
    )
    from cxrlite.bench.report import plot_throughput
    from cxrlite.fileio import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "loadtest.json", result)
    plot_throughput(result, out / "throughput.png")
    print_summary(result)
# fmt: on


if __name__ == "__main__":
    run_subcommand("load")
