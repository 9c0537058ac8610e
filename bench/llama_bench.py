"""llama.cpp prompt processing (pp) and token generation (tg) speed of a GGUF, like llama-bench.

    cxrlite bench llama llm-q4_k_m.gguf --prompt-lengths 64,256,512 \
        --gen 128 --threads 1,2 --reps 3 --out llama_bench.json
    python -m cxrlite.bench.llama_bench llm-q4_k_m.gguf          # the same

pp N: N random token ids decoded as one prompt (in llama.cpp's n_batch chunks) from an empty KV
cache, reported as N / seconds. tg N: N tokens decoded one at a time after a 1-token prompt,
reported as N / seconds, as llama-bench does (its "tg128"). Each test runs `reps` times after one
untimed warm-up; mean and standard deviation of tokens/s are reported. Runs through
cxrlite.runtime.llamacpp.LlamaCppLLM (the runtime's own llama.cpp path), f16 KV cache, flash
attention on llama.cpp's automatic setting.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import numpy as np

from cxrlite.bench.options import int_list, run_subcommand

logger = logging.getLogger(__name__)


def _rate(n: int, seconds: list[float]) -> dict[str, float]:
    rates = np.array([n / s for s in seconds])
    return {"tokens_per_s": float(rates.mean()), "std": float(rates.std()), "reps": len(rates)}


def llama_bench(
    gguf_path: str | os.PathLike,
    prompt_lengths: Sequence[int] = (64, 256, 512),
    gen: int = 128,
    threads: Sequence[int | None] = (None,),
    *,
    reps: int = 3,
    n_gpu_layers: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """{"model", "results": [{"test": "pp512" | "tg128", "threads", "tokens_per_s", "std",
    "reps"}]}."""
    from cxrlite.bench.report import gguf_weight_bytes
    from cxrlite.runtime.llamacpp import LlamaCppLLM

    if reps < 1 or gen < 0 or any(n < 1 for n in prompt_lengths):
        raise ValueError("reps and prompt lengths must be >= 1, gen >= 0")
    path = Path(gguf_path)
    n_ctx = max([*prompt_lengths, gen + 1]) + 8
    rng = np.random.default_rng(seed)
    results = []
    for n_threads in threads:
        with LlamaCppLLM(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers) as llm:
            vocab = llm.n_vocab
            used = n_threads or os.cpu_count() or 1
            for n in prompt_lengths:
                seconds = []
                for rep in range(reps + 1):
                    ids = rng.integers(3, vocab, size=n).tolist()
                    llm.reset()
                    start = time.perf_counter()
                    llm.eval([ids])
                    if rep:  # the first pass is the warm-up
                        seconds.append(time.perf_counter() - start)
                results.append({"test": f"pp{n}", "threads": used, **_rate(n, seconds)})
            if gen:
                seconds = []
                for rep in range(reps + 1):
                    llm.reset()
                    token = int(np.argmax(llm.eval([[1]])))
                    start = time.perf_counter()
                    for _ in range(gen):
                        token = int(np.argmax(llm.eval([[token]])))
                    if rep:
                        seconds.append(time.perf_counter() - start)
                results.append({"test": f"tg{gen}", "threads": used, **_rate(gen, seconds)})
    return {
        "model": str(path),
        "size_bytes": path.stat().st_size,
        "weights": gguf_weight_bytes(path),
        "n_gpu_layers": n_gpu_layers,
        "results": results,
    }


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    name = Path(result["model"]).name
    table = Table(title=f"{name} ({result['size_bytes'] / 2**20:.1f} MiB)")
    for column in ("test", "threads", "tokens/s", "std"):
        table.add_column(column, justify="right")
    for row in result["results"]:
        table.add_row(
            row["test"], str(row["threads"]), f"{row['tokens_per_s']:.2f}", f"{row['std']:.2f}"
        )
    Console().print(table)


# fmt: off
@click.command("llama")
@click.argument("gguf", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--prompt-lengths", default="64,256,512", show_default=True,
              help="Comma-separated prompt lengths, one pp test each.")
@click.option("--gen", type=click.IntRange(0), default=128, show_default=True,
              help="Tokens of the tg test (0: none).")
@click.option("--threads", default="", help="Comma-separated thread counts [default: all cores].")
@click.option("--reps", type=click.IntRange(1), default=3, show_default=True,
              help="Timed repetitions after one warm-up.")
@click.option("--n-gpu-layers", type=int, default=0, show_default=True,
              help="Layers offloaded to the GPU.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the result JSON here.")
def llama_command(gguf: Path, prompt_lengths: str, gen: int, threads: str, reps: int,
                  n_gpu_layers: int, out: Path | None) -> None:
    """llama.cpp prompt processing (pp) and token generation (tg) tokens/s of a GGUF, like
    llama-bench."""
    result = llama_bench(
        gguf, int_list(prompt_lengths, "--prompt-lengths"), gen,
        int_list(threads, "--threads") or [None], reps=reps, n_gpu_layers=n_gpu_layers,
    )
    print_table(result)
    if out is not None:
        from cxrlite.fileio import write_json

        write_json(out, result)
# fmt: on


if __name__ == "__main__":
    run_subcommand("llama")
