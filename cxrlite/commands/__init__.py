"""Click subcommand groups of the `cxrlite` CLI, one module per group."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click


def runtime_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The backend choices of every command that opens a bundle's Runtime (report, serve)."""
    options = [
        click.option(
            "--vision-backend",
            type=click.Choice(["auto", "onnx", "tensorrt", "torch"]),
            default="auto",
            show_default=True,
            help="Vision tower backend.",
        ),
        click.option(
            "--vision-variant", help="A vision variant of the bundle, e.g. onnx-fp16, onnx-int8."
        ),
        click.option(
            "--llm-backend",
            type=click.Choice(["auto", "llama.cpp", "gguf", "gptq", "torch"]),
            default="auto",
            show_default=True,
            help="LLM backend.",
        ),
        click.option(
            "--llm-variant", help="An LLM variant of the bundle, e.g. gguf-q4_k_m, gptq-4bit."
        ),
        click.option(
            "--n-gpu-layers",
            type=int,
            default=None,
            help="LLM layers on the GPU (llama.cpp); default all when a GPU is usable.",
        ),
        click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads."),
        click.option(
            "--checkpoint",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Source checkpoint for the torch backends (default: the bundle's record).",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn
