"""`cxrlite bench`: the benchmarks, one subcommand per tool.

    cxrlite bench BUNDLE [options]           # = cxrlite bench latency BUNDLE: per-phase latency
    cxrlite bench compare|batching|llama-server|soak|load|llama|bandwidth|vision|labeler|dicom ...

A first argument that is not a subcommand's name goes to `latency`, so `cxrlite bench BUNDLE`
(and `cxrlite bench --shape 1b`) work as they always did. A bundle folder named like a
subcommand needs `cxrlite bench latency NAME` (or ./NAME). Tools are imported only when run, so
`cxrlite bench --help` stays fast.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path

import click

from cxrlite.bench.options import names as _names
from cxrlite.model.config import SHAPES

logger = logging.getLogger(__name__)

SHAPE_LLM_DEFAULT = "gguf-f16,gguf-q8_0,gguf-q4_k_m"
DEFAULT_SUBCOMMAND = "latency"

# name -> (module, attribute, one-line help), as `cxrlite bench --help` lists them.
TOOLS = {
    "latency": (
        "cxrlite.commands.bench",
        "latency",
        "Per-phase latency and memory of a bundle's backends (default).",
    ),
    "compare": (
        "cxrlite.bench.server_compare",
        "compare_command",
        "cxrlite serve vs llama.cpp's servers on the same GGUF.",
    ),
    "batching": (
        "cxrlite.bench.batching",
        "batching_command",
        "Batching: cxrlite before/after vs llama-server.",
    ),
    "llama-server": (
        "cxrlite.bench.llama_server",
        "llama_server_command",
        "Build llama.cpp's C++ llama-server once (the peer).",
    ),
    "mmproj": (
        "cxrlite.bench.mmproj",
        "mmproj_command",
        "A checkpoint's vision tower as llama.cpp's mmproj.",
    ),
    "soak": (
        "cxrlite.bench.soak",
        "soak_command",
        "Steady load on cxrlite serve: errors and memory drift.",
    ),
    "load": (
        "cxrlite.bench.loadtest",
        "load_command",
        "Concurrency sweep of a running OpenAI-compatible server.",
    ),
    "llama": (
        "cxrlite.bench.llama_bench",
        "llama_command",
        "llama.cpp pp/tg tokens/s of a GGUF, like llama-bench.",
    ),
    "bandwidth": (
        "cxrlite.bench.bandwidth",
        "bandwidth_command",
        "Main-memory bandwidth, the bound of CPU decoding.",
    ),
    "vision": (
        "cxrlite.bench.vision_micro",
        "vision_command",
        "Vision tower of each backend at several batch sizes.",
    ),
    "labeler": (
        "cxrlite.bench.labeler_speed",
        "labeler_command",
        "Report labeler speed on one core (reports a second).",
    ),
    "dicom": (
        "cxrlite.bench.dicom_latency",
        "dicom_command",
        "DICOM studies to cxrlite: receipt-to-SR latency, rate.",
    ),
}


class BenchGroup(click.Group):
    """The tools as lazily imported subcommands; anything else first goes to `latency`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(TOOLS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in TOOLS:
            return None
        module, attr, _ = TOOLS[name]
        return getattr(importlib.import_module(module), attr)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        help_names = set(ctx.help_option_names)
        if args and args[0] not in TOOLS and args[0] not in help_names:
            args = [DEFAULT_SUBCOMMAND, *args]
        return super().parse_args(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, help_) for name, (_, _, help_) in TOOLS.items()])


@click.group(cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
def bench() -> None:
    """Benchmarks: latency per phase and backend, servers under load, micro-benchmarks.

    \b
      cxrlite bench BUNDLE [OPTIONS]     the same as cxrlite bench latency BUNDLE [OPTIONS]
      cxrlite bench TOOL --help          a tool's options
    """


# fmt: off
@bench.command("latency")
@click.argument("bundle_dir", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--runs", type=click.IntRange(1), default=10, show_default=True,
              help="Timed runs per backend.")
@click.option("--warmup", type=click.IntRange(0), default=2, show_default=True,
              help="Untimed runs first.")
@click.option("--max-tokens", type=click.IntRange(1, 8192), default=64, show_default=True,
              help="Tokens generated per run, always exactly this many (EOS ignored).")
@click.option("--vision-backends", show_default=True,
              default="torch,torch-bf16,onnx-fp32,onnx-fp16,onnx-int8,tensorrt",
              help="Vision backends to compare; those that cannot run here are listed as skipped.")
@click.option("--llm-variants", default=None,
              help="LLM variants to compare, e.g. torch,gguf-f16,gguf-q8_0,gguf-q4_k_m,gptq-4bit "
                   "[default: torch + every variant of the bundle].")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (default: all).")
@click.option("--n-gpu-layers", type=int, default=None,
              help="llama.cpp layers on the GPU (default: all when usable).")
@click.option("--n-ctx", type=click.IntRange(64), default=None,
              help="LLM context (default: the model's, at most 4096).")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Radiograph (DICOM/PNG/JPEG) to time; default a 1024 px phantom PNG.")
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="Source checkpoint for the torch reference, if it moved since export.")
@click.option("--isolate/--no-isolate", default=True, show_default=True,
              help="Each backend in its own process (true peak memory per backend) or all in "
                   "this one (RSS deltas).")
@click.option("--bandwidth-mb", type=click.IntRange(0), default=512, show_default=True,
              help="Array size of the memory-bandwidth measurement (0: skip it and the bound).")
@click.option("--load-test", "load_test", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A loadtest.json (cxrlite bench load) to plot throughput against concurrency.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write bench.json, bench.md and PNG plots here.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON result instead of tables.")
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default=None,
              help="Benchmark random weights of real size instead of BUNDLE_DIR: 1b = ViT-B/16 + "
                   "Llama-3.2-1B shape, 7b = SO400M + Llama-2-7B shape, llava-rad = DINOv2 "
                   "ViT-B/14 at 518 px (1369 image tokens) + Vicuna-7B (use --llm-variants "
                   "gguf-q4_k_m on small machines).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where --shape builds are kept [default: ~/.cache/cxrlite/shapes].")
@click.option("--scale", type=click.FloatRange(0, 1, min_open=True), default=1.0,
              show_default=True, help="--shape: shrink head counts and widths by this factor.")
@click.option("--layers", type=click.IntRange(1), default=None,
              help="--shape: LLM layers (default: the real count).")
@click.option("--vision-layers", type=click.IntRange(1), default=None,
              help="--shape: vision layers.")
def latency(bundle_dir: Path | None, runs: int, warmup: int, max_tokens: int,
            vision_backends: str, llm_variants: str | None, threads: int | None,
            n_gpu_layers: int | None, n_ctx: int | None, image: str | None,
            checkpoint: str | None, isolate: bool, bandwidth_mb: int, load_test: Path | None,
            out: Path | None, as_json: bool, shape: str | None, cache_dir: Path | None,
            scale: float, layers: int | None, vision_layers: int | None) -> None:
    """Time every phase of a request on BUNDLE_DIR's backends side by side: image decoding,
    preprocessing, the vision tower, prefill (time to first token), decoding (tokens/s,
    inter-token latency) and end to end, as p50/p90/p99 over --runs after --warmup; peak memory
    per backend, artifact sizes, speed relative to the PyTorch reference, decode tokens/s against
    this machine's memory-bandwidth bound, and a GPU fit check for 8/16/24 GB cards."""
    from cxrlite.bench import report
    from cxrlite.bench.latency import BenchSettings, run_bench

    vision = _names(vision_backends) or ()
    llm = _names(llm_variants)
    if shape is not None:
        if bundle_dir is not None:
            raise click.UsageError("give BUNDLE_DIR or --shape, not both")
        from cxrlite.bench.shapes import build_shape_bundle

        llm = llm or _names(SHAPE_LLM_DEFAULT)
        build_llm = [v for v in llm if v.startswith("gguf-")]
        click.echo(f"building/reusing the random-weight {shape} shape (first run: minutes) ...",
                   err=True)
        bundle_dir = build_shape_bundle(
            shape, llm_variants=build_llm or ["gguf-f16"],
            vision_variants=["onnx-fp32", *[v for v in vision if v in ("onnx-fp16", "onnx-int8")]],
            cache_dir=cache_dir, scale=scale, layers=layers, vision_layers=vision_layers,
        )  # fmt: skip
    elif bundle_dir is None:
        raise click.UsageError("give BUNDLE_DIR, or --shape 1b|7b for random weights of real size")
    settings = BenchSettings(
        runs=runs, warmup=warmup, max_tokens=max_tokens, vision_backends=vision, llm_variants=llm,
        threads=threads, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, checkpoint=checkpoint, image=image,
        isolate=isolate, bandwidth_mb=bandwidth_mb,
    )  # fmt: skip
    result = run_bench(bundle_dir, settings)
    loadtest = json.loads(load_test.read_text(encoding="utf-8")) if load_test else None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        from rich.console import Console

        report.render_table(result, Console(width=max(Console().width, 160)))
    if out is not None:
        paths = report.write_outputs(result, out, loadtest)
        click.echo("wrote " + ", ".join(str(p) for p in paths.values()), err=True)
# fmt: on
