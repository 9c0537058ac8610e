"""cxrlite serve against llama.cpp's servers on the same GGUF: llama-cpp-python's, or llama.cpp's
own C++ `llama-server` with the vision tower as an mmproj and image requests (Ollama's path).

    cxrlite bench compare BUNDLE --concurrency 1,4,8 --requests 16 --out cmp/
    cxrlite bench compare BUNDLE --llama-server build/bin/llama-server --mmproj mmproj.gguf \
        --image study.png --parallel 4 --concurrency 1,4       # images (cxrlite bench mmproj)
    python -m cxrlite.bench.server_compare BUNDLE --concurrency 1,4,8     # the same
    python -m cxrlite.bench.server_compare BUNDLE --mode soak ...         # cxrlite bench soak

It starts `cxrlite serve BUNDLE` and `python -m llama_cpp.server --model GGUF` (or
`llama-server --model GGUF [--mmproj F] --parallel N`) on the bundle's default LLM variant (or
--llm-variant: the same file), one after the other, never both at once, each on a free loopback
port, and sends both the same streaming requests (greedy, same max_tokens, the same image with
--image) at each concurrency level through cxrlite.bench.loadtest. With
interleaving (default) each level runs on a fresh start of each server, A1 B1 A4 B4 ..., so a
drift in the machine's load hits both alike. Output: compare.json (with the environment),
compare.md and a terminal table: requests/s, tokens/s, tokens per request, TTFT p50/p90, ITL p50,
TPOT p50 (time per output token after the first: ITL shrinks to ~0 when a server sends tokens in
bursts), latency p50/p90 per server and level, and the cxrlite/llama_cpp ratios. Exit code: 0
when cxrlite is equal or better at every level (within --tolerance), 1 when not, 2 on errors.

Servers always stop (SIGINT, then SIGKILL), on errors, Ctrl-C and SIGTERM too; their output goes
to <server>.log in --out (phantom requests only: no patient data reaches these logs). The soak
test of cxrlite serve alone is `cxrlite bench soak` (cxrlite.bench.soak).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from cxrlite.bench.options import int_list, run_subcommand
from cxrlite.bench.servers import (
    DEFAULT_THREADS,
    ServerCompareError,
    bundle_llm,
    cxrlite_spec,
    free_port,
    llama_cpp_spec,
    llama_server_spec,
    managed_run,
    running_server,
    server_options,
)
from cxrlite.data.prompts import FINDINGS_PROMPT

logger = logging.getLogger(__name__)

SCHEMA_COMPARE = "cxrlite-server-compare/1"
SERVERS = ("cxrlite", "llama_cpp")


async def _probe(
    url: str, prompt: str, image: str | None, max_tokens: int, timeout: float
) -> dict[str, Any]:
    """One untimed non-streaming request: the token counts the server itself reports."""
    import httpx

    from cxrlite.bench.loadtest import CHAT_PATH, build_payload, discover_model

    data = Path(image).read_bytes() if image else None
    async with httpx.AsyncClient(timeout=timeout) as client:
        model = await discover_model(client, url, {})
        body = {**build_payload(model, prompt, data, max_tokens, image or ""), "stream": False}
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
    prompt: str = FINDINGS_PROMPT,
    threads: int = DEFAULT_THREADS,
    llm_variant: str | None = None,
    warmup: int = 2,
    interleave: bool = True,
    tolerance: float = 0.05,
    start_timeout: float = 300.0,
    request_timeout: float = 300.0,
    image: str | None = None,
    llama_server: str | Path | None = None,
    mmproj: str | Path | None = None,
    parallel: int = 1,
    distinct_images: bool = False,
) -> dict[str, Any]:
    """Both servers on the same GGUF and requests, one server at a time (module docs); the peer
    is llama-cpp-python's server, or `llama_server` (a binary) with `mmproj` and `parallel`."""
    from cxrlite.bench.loadtest import run_loadtest
    from cxrlite.bench.report import environment

    if not concurrency or min(concurrency) < 1 or requests < 1 or max_tokens < 1:
        raise ServerCompareError("concurrency levels, requests and max_tokens must be >= 1")
    env = environment()  # before the servers start: the load average is the machine's own
    llm = bundle_llm(bundle_dir, llm_variant)
    out = Path(out_dir)
    specs = {
        "cxrlite": lambda: cxrlite_spec(bundle_dir, free_port(), threads, llm_variant),
        "llama_cpp": lambda: (
            llama_server_spec(
                llama_server,
                llm.gguf,
                free_port(),
                threads,
                llm.n_ctx,
                mmproj=mmproj,
                parallel=parallel,
            )  # fmt: skip
            if llama_server
            else llama_cpp_spec(llm.gguf, free_port(), threads, llm.n_ctx)
        ),
    }
    if image and not (llama_server and mmproj):
        raise ServerCompareError("image requests need the llama-server peer with --mmproj")
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
                        _probe(spec.url, prompt, image, max_tokens, request_timeout)
                    )
                result = run_loadtest(
                    spec.url, segment, requests=requests, prompt=prompt, max_tokens=max_tokens,
                    timeout=request_timeout, warmup=warmup, model=info["probe"]["model"],
                    image=image, distinct_images=distinct_images,
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
                "warmup": warmup, "interleave": interleave, "tolerance": tolerance,
                "image": image, "peer": "llama-server" if llama_server else "llama_cpp.server",
                "peer_parallel": parallel if llama_server else 1,
                "distinct_images": distinct_images}  # fmt: skip
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
                c, name, str(lv["ok"]),
                ", ".join(f"{k}: {v}" for k, v in lv["errors"].items()) or "-",
                f"{lv['requests_per_s']:.2f}", f"{lv['tokens_per_s']:.1f}",
                "-" if not tpr["n"] else f"{tpr['min']:.0f}-{tpr['max']:.0f}", _two(lv["ttft_ms"]),
                _one(lv["itl_ms"]), _one(lv["tpot_ms"]), _two(lv["latency_ms"]),
            ])  # fmt: skip
        r = row["ratio"]
        rows.append([
            c, "ratio" + (" ok" if r["equal_or_better"] else " WORSE"), "", "",
            _x(r["requests_per_s"]), _x(r["tokens_per_s"]), "",
            f"{_x(r['ttft_ms_p50'])}/{_x(r['ttft_ms_p90'])}", _x(r["itl_ms_p50"]),
            _x(r["tpot_ms_p50"]),
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


# --- command line ----------------------------------------------------------------------------


def print_compare(result: dict[str, Any]) -> None:
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


# fmt: off
@click.command("compare")
@server_options("server-compare")
@click.option("--concurrency", default="1,4,8", show_default=True, help="Comma-separated levels.")
@click.option("--requests", type=click.IntRange(1), default=16, show_default=True,
              help="Requests per level.")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True,
              help="Untimed requests per server start.")
@click.option("--interleave/--no-interleave", default=True, show_default=True,
              help="A fresh start of each server per level, or each server started once.")
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="Noise allowed in the ratios.")
@click.option("--llama-server", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Compare with llama.cpp's C++ llama-server (this binary) "
              "instead of llama_cpp.server.")
@click.option("--mmproj", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="llama-server's vision tower (cxrlite bench mmproj).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Send this image with every request (needs --mmproj).")
@click.option("--parallel", type=click.IntRange(1), default=1, show_default=True,
              help="llama-server's slots decoded together.")
@click.option("--distinct-images", is_flag=True,
              help="Each request its own picture (--image with one pixel changed): no cache hits.")
@click.pass_context
def compare_command(ctx: click.Context, bundle: Path, out: Path, threads: int,
                    llm_variant: str | None, prompt: str, max_tokens: int, start_timeout: float,
                    request_timeout: float, concurrency: str, requests: int, warmup: int,
                    interleave: bool, tolerance: float, llama_server: Path | None,
                    mmproj: Path | None, image: Path | None, parallel: int,
                    distinct_images: bool) -> None:
    """cxrlite serve vs llama.cpp's server on the bundle's GGUF, one at a time, same requests.
    Exit code 0 when cxrlite is equal or better at every level, 1 when not, 2 on errors."""
    from cxrlite.fileio import atomic_write_text, write_json

    levels = int_list(concurrency, "--concurrency")
    with managed_run():
        out.mkdir(parents=True, exist_ok=True)
        result = run_compare(
            bundle, out, concurrency=levels, requests=requests, warmup=warmup,
            interleave=interleave, tolerance=tolerance, max_tokens=max_tokens, prompt=prompt,
            threads=threads, llm_variant=llm_variant, start_timeout=start_timeout,
            request_timeout=request_timeout, image=str(image) if image else None,
            llama_server=llama_server, mmproj=mmproj, parallel=parallel,
            distinct_images=distinct_images,
        )
        write_json(out / "compare.json", result)
        atomic_write_text(out / "compare.md", compare_markdown(result))
        print_compare(result)
    ctx.exit(0 if result["equal_or_better"] else 1)
# fmt: on


def legacy_argv(argv: Sequence[str]) -> tuple[str, list[str]]:
    """`python -m cxrlite.bench.server_compare [--mode compare|soak] ARGS` as before the bench
    subcommands: (the subcommand, its arguments)."""
    args, mode = list(argv), "compare"
    for i, arg in enumerate(args):
        if arg == "--mode" and i + 1 < len(args):
            mode = args[i + 1]
            del args[i : i + 2]
            break
        if arg.startswith("--mode="):
            mode = arg.split("=", 1)[1]
            del args[i]
            break
    return mode, args


if __name__ == "__main__":
    run_subcommand(*legacy_argv(sys.argv[1:]))
