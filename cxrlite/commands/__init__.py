"""Click subcommand groups of the `cxrlite` CLI, one module per group."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cxrlite.runtime.plan import DEFAULT_SLOTS_CPU, DEFAULT_SLOTS_GPU

if TYPE_CHECKING:
    from cxrlite.runtime import Runtime


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """The backend choices of a command that opens a bundle's Runtime (report, serve), as the
    options of `with_runtime_options` give them."""

    vision_backend: str
    vision_variant: str | None
    llm_backend: str
    llm_variant: str | None
    n_gpu_layers: int | None
    threads: int | None
    slots: int | None
    batch_invariant: bool
    checkpoint: Path | None

    def open(self, bundle_dir: Path, **kwargs: Any) -> Runtime:
        """`Runtime.from_bundle` with these choices; `kwargs` adds the command's own."""
        from cxrlite.runtime import Runtime

        return Runtime.from_bundle(bundle_dir, **dataclasses.asdict(self), **kwargs)


_RUNTIME_OPTIONS = [
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
    click.option(
        "--threads",
        type=click.IntRange(1),
        default=None,
        help="CPU threads of the LLM and the vision tower; default: all cores but one "
        "(`cxrlite doctor` shows the choice and why).",
    ),
    click.option(
        "--parallel",
        "slots",
        type=click.IntRange(1, 64),
        default=None,
        help="Sequences the LLM decodes together (llama.cpp; continuous batching); default: "
        f"{DEFAULT_SLOTS_CPU} on a CPU, {DEFAULT_SLOTS_GPU} on a GPU.",
    ),
    click.option(
        "--batch-invariant/--no-batch-invariant",
        default=True,
        show_default=True,
        help="A request's output is the same alone or batched with others (llama.cpp on a CPU: "
        "weights in the plain layout); --no-batch-invariant lets llama.cpp repack them for "
        "faster CPU kernels whose rounding depends on the batch.",
    ),
    click.option(
        "--checkpoint",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Source checkpoint for the torch backends (default: the bundle's record).",
    ),
]


def with_runtime_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the backend options to a command; it receives them as one `runtime_options`
    argument (a RuntimeOptions) instead of one argument each."""
    names = [field.name for field in dataclasses.fields(RuntimeOptions)]

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        options = RuntimeOptions(**{name: kwargs.pop(name) for name in names})
        return fn(*args, runtime_options=options, **kwargs)

    for option in reversed(_RUNTIME_OPTIONS):
        command = option(command)
    return command
