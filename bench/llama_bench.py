"""llama.cpp prompt processing (pp) and token generation (tg) speed of a GGUF, like llama-bench.

    python -m cxrlite.bench.llama_bench llm-q4_k_m.gguf --prompt-lengths 64,256,512 \
        --gen 128 --threads 1,2 --reps 3 --out llama_bench.json

pp N: N random token ids decoded as one prompt (in llama.cpp's n_batch chunks) from an empty KV
cache, reported as N / seconds. tg N: N tokens decoded one at a time after a 1-token prompt,
reported as N / seconds, as llama-bench does (its "tg128"). Each test runs `reps` times after one
untimed warm-up; mean and standard deviation of tokens/s are reported. Runs through
cxrlite.runtime.llamacpp.LlamaCppLLM (the runtime's own llama.cpp path), f16 KV cache, flash
attention on llama.cpp's automatic setting.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llama.cpp pp/tg tokens/s of a GGUF.")
    parser.add_argument("gguf")
    parser.add_argument("--prompt-lengths", default="64,256,512")
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--threads", default="", help="comma-separated (default: all cores)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the result JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    threads = [int(t) for t in args.threads.split(",") if t.strip()] or [None]
    result = llama_bench(
        args.gguf,
        [int(n) for n in args.prompt_lengths.split(",") if n.strip()],
        args.gen,
        threads,
        reps=args.reps,
        n_gpu_layers=args.n_gpu_layers,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{Path(args.gguf).name} ({result['size_bytes'] / 2**20:.1f} MiB)")
    for column in ("test", "threads", "tokens/s", "std"):
        table.add_column(column, justify="right")
    for row in result["results"]:
        table.add_row(
            row["test"], str(row["threads"]), f"{row['tokens_per_s']:.2f}", f"{row['std']:.2f}"
        )
    Console().print(table)
    if args.out:
        from cxrlite.fileio import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
