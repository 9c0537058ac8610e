"""Benchmark results as numbers, tables, JSON, Markdown and PNG plots.

    summarize([12.1, 13.0, ...])        # {"n", "mean", "min", "max", "p50", "p90", "p99"}
    write_outputs(result, "bench-out/")  # bench.json, bench.md, latency.png (+ throughput.png)
    render_table(result)                 # rich tables on the terminal

Percentiles are numpy's linear interpolation, so p50 <= p90 <= p99 always holds. Plots use
matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import importlib
import logging
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cxrlite.bundle import VARIANT_SECTIONS, Kind

logger = logging.getLogger(__name__)

PERCENTILES = (50, 90, 99)
IMAGE_PHASES = ("decode_ms", "preprocess_ms")
LLM_PHASES = ("decode_ms", "preprocess_ms", "vision_ms", "prefill_ms", "decode_total_ms")
PHASE_LABELS = {"decode_ms": "image decode", "decode_total_ms": "token decode"}
_VERSIONED = ("torch", "onnxruntime", "llama_cpp", "transformers", "numpy", "gguf", "tensorrt")
_DISTRIBUTIONS = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "llama_cpp": ("llama_cpp_python", "llama-cpp-python"),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
}


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """n, mean, min, max and p50/p90/p99 of a sample (None figures when it is empty)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {
            "n": 0,
            "mean": None,
            "min": None,
            "max": None,
            **{f"p{q}": None for q in PERCENTILES},
        }
    qs = np.percentile(array, PERCENTILES)
    return {
        "n": int(array.size),
        "mean": float(array.mean()),
        "min": float(array.min()),
        "max": float(array.max()),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, qs, strict=True)},
    }


# --- environment -----------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        import cpuinfo

        name = cpuinfo.get_cpu_info().get("brand_raw")
        if name:
            return str(name)
    except Exception:  # py-cpuinfo shells out and parses; any failure falls back to /proc
        logger.debug("py-cpuinfo failed", exc_info=True)
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    """The installed distribution's version (without importing it), else the module's."""
    from importlib import metadata

    for dist in _DISTRIBUTIONS.get(module, (module,)):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except Exception:  # a missing or broken optional library is simply absent here
        return None


def environment() -> dict[str, Any]:
    """CPU model, cores, RAM, GPU and library versions: what a result is only valid for."""
    import psutil

    import cxrlite

    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            gpu = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)}
    except ImportError:
        pass
    return {
        "cpu": cpu_model(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cxrlite": cxrlite.__version__,
        "versions": {name: _version(name) for name in _VERSIONED},
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# --- sizes -----------------------------------------------------------------------------------


def variant_bytes(bundle: Any, section: str, name: str) -> int | None:
    """Bytes on disk of a bundle variant, or None when the bundle has no such variant."""
    if name not in bundle.variants(section):
        return None
    return bundle.variant_bytes(section, name)


def gguf_weight_bytes(path: str | os.PathLike) -> dict[str, int]:
    """Tensor data bytes of a GGUF, and those read per generated token: every tensor, except the
    token embedding when a separate output matrix exists (a lookup reads one row of it)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    per_token = total - tensors.get("token_embd.weight", 0) if "output.weight" in tensors else total
    return {"tensor_bytes": total, "bytes_read_per_token": per_token}


def bundle_summary(bundle: Any) -> dict[str, Any]:
    from cxrlite.model.config import count_parameters

    cfg = bundle.config
    params = count_parameters(cfg)
    return {
        "path": str(bundle.path),
        "name": bundle.path.name,
        "parameters": params,
        "n_image_tokens": cfg.n_image_tokens,
        "image_size": cfg.vision.image_size,
        "llm": {
            "layers": cfg.llm.num_layers,
            "hidden": cfg.llm.hidden_size,
            "kv_heads": cfg.llm.num_kv_heads,
            "head_dim": cfg.llm.head_size,
            "vocab": cfg.llm.vocab_size,
        },
        "variants": {s: sorted(bundle.variants(s)) for s in VARIANT_SECTIONS},
        "default": dict(bundle.default),
        "random_weights": any(
            v.entry.get("random_weights")
            for section in VARIANT_SECTIONS
            for v in bundle.variants(section).values()
        ),
    }


def summarize_job(raw: dict[str, Any], bundle: Any) -> dict[str, Any]:
    """A worker's raw timings as percentiles, with memory and artifact sizes."""
    from cxrlite.model.config import count_parameters

    params = count_parameters(bundle.config)
    skip = {"ok", "kind", "spec", "memory"}
    out: dict[str, Any] = {"spec": raw["spec"], "memory": raw["memory"]}
    for key, value in raw.items():
        if key in skip:
            continue
        out[key] = summarize(value) if isinstance(value, list) else value
    out["memory"]["load_delta_mb"] = raw.get("load_delta_mb")
    if raw["kind"] == "vision":
        tower = params["vision"] + params["bridger"]
        if raw["name"].startswith("torch"):
            out["size_bytes"] = tower * (2 if raw["name"].endswith("bf16") else 4)
            out["size_note"] = "parameters x dtype"
        else:
            out["size_bytes"] = variant_bytes(bundle, "vision", raw["name"])
        p50 = out["vision_ms"]["p50"]
        out["images_per_s"] = 1000.0 / p50 if p50 else None
    else:
        if raw["name"] == "torch-fp32":
            out["size_bytes"] = params["llm"] * 4
            out["size_note"] = "parameters x dtype"
        else:
            out["size_bytes"] = variant_bytes(bundle, "llm", raw["name"])
            variant = bundle.llm_variants.get(raw["name"])
            if variant is not None and variant.kind == Kind.GGUF:
                out["weights"] = gguf_weight_bytes(bundle.variant_file("llm", raw["name"]))
    return out


# --- derived figures -------------------------------------------------------------------------


def _p50(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return value.get("p50") if isinstance(value, dict) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def add_ratios(result: dict[str, Any]) -> None:
    """Speed of each backend relative to the PyTorch fp32 reference, when it was measured."""
    ref_v = result["vision"].get("torch-fp32")
    for row in result["vision"].values():
        ref = _p50(ref_v, "vision_ms") if ref_v else None
        row["speedup_vs_torch"] = _ratio(ref, _p50(row, "vision_ms"))
    ref_l = result["llm"].get("torch-fp32")
    for row in result["llm"].values():
        row["tokens_per_s_vs_torch"] = _ratio(
            _p50(row, "tokens_per_s"), _p50(ref_l, "tokens_per_s") if ref_l else None
        )
        row["prefill_speedup_vs_torch"] = _ratio(
            _p50(ref_l, "prefill_ms") if ref_l else None, _p50(row, "prefill_ms")
        )
        row["e2e_speedup_vs_torch"] = _ratio(
            _p50(ref_l, "e2e_ms") if ref_l else None, _p50(row, "e2e_ms")
        )
        if "repeat_cold_ttft_ms" in row:  # TTFT p50 cold / repeated image
            cold = _p50(row, "repeat_cold_ttft_ms")
            row["repeat_same_speedup"] = _ratio(cold, _p50(row, "repeat_same_ttft_ms"))
            row["repeat_other_speedup"] = _ratio(cold, _p50(row, "repeat_other_ttft_ms"))


def kv_bytes_per_token(bundle_llm: dict[str, Any], positions: float, kv_bytes: int = 2) -> float:
    """KV cache bytes read to generate one token at `positions` cached positions (K and V of
    every layer; f16 cache by default)."""
    per_position = 2 * bundle_llm["layers"] * bundle_llm["kv_heads"] * bundle_llm["head_dim"]
    return per_position * kv_bytes * positions


def add_bandwidth_bounds(result: dict[str, Any]) -> None:
    """Decode tokens/s of each CPU GGUF variant against the memory-bandwidth bound: measured
    read bandwidth / (weight bytes read per token + KV cache bytes read at the mean position)."""
    from cxrlite.bench.bandwidth import last_level_cache_bytes

    bandwidth = (result.get("bandwidth") or {}).get("read_gbs")
    llm_shape = result["bundle"]["llm"]
    cache = last_level_cache_bytes()
    for row in result["llm"].values():
        weights = row.get("weights")
        if not weights or not bandwidth:
            continue
        if row.get("device") != "cpu":
            row["bandwidth_bound"] = {"note": "offloaded to a GPU: the CPU bound does not apply"}
            continue
        mean_position = row["n_prompt"] + (row["max_tokens"] - 1) / 2
        kv = kv_bytes_per_token(llm_shape, mean_position)
        per_token = weights["bytes_read_per_token"] + kv
        bound = bandwidth * 1e9 / per_token
        tps = _p50(row, "tokens_per_s")
        row["bandwidth_bound"] = {
            "bytes_per_token": per_token,
            "kv_bytes_per_token": kv,
            "read_gbs": bandwidth,
            "bound_tokens_per_s": bound,
            "percent_of_bound": 100.0 * tps / bound if tps else None,
            # read from the CPU cache, not main memory: the main-memory bound does not hold
            "fits_in_cache": cache is not None and per_token <= cache,
            "last_level_cache_bytes": cache,
        }


def _bound_cell(bound: dict[str, Any]) -> str:
    cell = _f(bound.get("percent_of_bound"))
    return f"{cell} (in cache)" if bound.get("fits_in_cache") and cell != "-" else cell


def add_fit_checks(result: dict[str, Any], bundle: Any) -> None:
    """Per LLM variant: predicted GPU memory at its context (weights + KV cache + fp16 vision
    tower + buffers) against 8/16/24 GB cards, and the measured peaks when a GPU was used."""
    from cxrlite.bench.shapes import fit_check
    from cxrlite.model.config import count_parameters

    params = count_parameters(bundle.config)
    vision_bytes = variant_bytes(bundle, "vision", "onnx-fp16")
    if vision_bytes is None:
        vision_bytes = 2 * (params["vision"] + params["bridger"])
    vision_gpu = max(
        (v["memory"].get("gpu_peak_delta_mb") or 0 for v in result["vision"].values()), default=0
    )
    result["fit"] = {}
    for name, row in result["llm"].items():
        if not row.get("size_bytes"):
            continue
        gpu_mb = row["memory"].get("gpu_peak_delta_mb")
        measured = int((gpu_mb + vision_gpu) * 2**20) if gpu_mb else None
        result["fit"][name] = fit_check(
            bundle.config, row["size_bytes"], vision_bytes, row["n_ctx"], measured_bytes=measured
        )


# --- tables ----------------------------------------------------------------------------------


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pcts(stats: dict[str, Any] | None, digits: int = 1) -> str:
    if not stats or stats.get("n", 0) == 0:
        return "-"
    return "/".join(_f(stats[f"p{q}"], digits) for q in PERCENTILES)


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def table_rows(result: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The result as titled tables of strings: {title: (header, rows)}."""
    image = result["image"]
    tables = {
        "Image (ms, p50/p90/p99)": (
            ["phase", "ms"],
            [[k.removesuffix("_ms"), _pcts(image[k], 2)] for k in IMAGE_PHASES],
        )
    }
    vision_rows = []
    for name, row in result["vision"].items():
        memory = row["memory"]
        vision_rows.append([
            name, row["device"], _pcts(row["vision_ms"], 2), _f(row.get("images_per_s")),
            _f(row.get("speedup_vs_torch"), 2), _f(memory.get("peak_rss_mb")),
            _f(memory.get("gpu_peak_delta_mb")), _mb(row.get("size_bytes")),
        ])  # fmt: skip
    tables["Vision tower (one image)"] = (
        ["backend", "device", "ms p50/p90/p99", "img/s", "x torch", "peak RSS MB", "GPU MB",
         "size MB"],
        vision_rows,
    )  # fmt: skip
    llm_rows = []
    for name, row in result["llm"].items():
        bound = row.get("bandwidth_bound") or {}
        llm_rows.append([
            name, row["device"], _pcts(row["prefill_ms"]), _pcts(row["ttft_ms"]),
            _pcts(row["tokens_per_s"]), _pcts(row["itl_ms"], 2), _pcts(row["e2e_ms"], 0),
            _f(row.get("tokens_per_s_vs_torch"), 2), _bound_cell(bound),
            _f(row["memory"].get("peak_rss_mb")), _mb(row.get("size_bytes")),
        ])  # fmt: skip
    max_tokens = result["settings"]["max_tokens"]
    tables[f"LLM ({max_tokens} tokens, vision on the runtime's default backend)"] = (
        ["variant", "device", "prefill ms", "TTFT ms", "tok/s", "ITL ms", "e2e ms", "x torch tok/s",
         "% BW bound", "peak RSS MB", "size MB"],
        llm_rows,
    )  # fmt: skip
    repeat_rows = []
    for name, row in result["llm"].items():
        if "repeat_cold_ttft_ms" not in row:
            continue
        cached = row.get("repeat_cached_tokens") or {}
        repeat_rows.append([
            name, row["device"], _pcts(row["repeat_cold_ttft_ms"]),
            _pcts(row["repeat_same_ttft_ms"]), _f(row.get("repeat_same_speedup"), 2),
            _pcts(row["repeat_other_ttft_ms"]), _f(row.get("repeat_other_speedup"), 2),
            f"{cached.get('same', '-')}/{cached.get('other', '-')}",
        ])  # fmt: skip
    if repeat_rows:
        tables["Repeated image: TTFT ms p50/p90/p99, cold = embedding and prompt caches empty"] = (
            ["variant", "device", "cold", "same image + prompt", "x cold",
             "same image, other question", "x cold", "reused positions"],
            repeat_rows,
        )  # fmt: skip
    fit = result.get("fit") or {}
    if fit:
        cards = list(next(iter(fit.values()))["cards"])
        tables["GPU fit (predicted: weights + KV cache + vision + buffers + CUDA)"] = (
            ["variant", "n_ctx", "predicted GB", *cards, "measured GB"],
            [
                [name, str(f["n_ctx"]), _f(f["predicted_gb"], 2)]
                + ["yes" if f["cards"][c]["fits"] else "no" for c in cards]
                + [_f(f["measured_gb"], 2)]
                for name, f in fit.items()
            ],
        )
    return tables


def render_table(result: dict[str, Any], console: Any = None) -> None:
    """Print the result as rich tables (to `console`, default stdout)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    env = result["environment"]
    console.print(
        f"[bold]{result['bundle']['name']}[/] on {env['cpu']} ({env['logical_cores']} threads, "
        f"{env['ram_gb']} GB RAM{', GPU ' + env['gpu']['name'] if env.get('gpu') else ''}), "
        f"{result['settings']['runs']} runs after {result['settings']['warmup']} warm-up"
    )
    for title, (header, rows) in table_rows(result).items():
        table = Table(title=title, title_justify="left")
        for column in header:
            table.add_column(column, justify="left" if column in header[:2] else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    bandwidth = result.get("bandwidth")
    if bandwidth:
        console.print(
            f"memory bandwidth: read {bandwidth['read_gbs']:.1f} GB/s, copy "
            f"{bandwidth['copy_gbs']:.1f} GB/s ({bandwidth['threads']} threads)"
        )
    for key, why in result.get("skipped", {}).items():
        console.print(f"[dim]skipped {key}: {why}[/]")
    busy = busy_note(env)
    if busy:
        console.print(f"[yellow]{busy}[/]")


def busy_note(env: dict[str, Any]) -> str | None:
    """A warning when other processes were using the CPUs (numbers are then noisy)."""
    load = (env.get("load_average") or [0.0])[0]
    cores = env.get("logical_cores") or 1
    if load <= 0.5 * cores:
        return None
    return (
        f"note: load average {load:.1f} on {cores} CPUs when the benchmark started: other "
        "processes compete for the cores, so timings are noisy (llama.cpp's spinning threads "
        "suffer most: try --threads below the free cores)"
    )


def to_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# cxrlite bench: {result['bundle']['name']}",
        "",
        f"- machine: {env['cpu']}, {env['logical_cores']} threads, {env['ram_gb']} GB RAM, "
        f"GPU: {env['gpu']['name'] if env.get('gpu') else 'none'}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in env['versions'].items() if v)}",
        f"- {result['settings']['runs']} runs after {result['settings']['warmup']} warm-up, "
        f"{result['settings']['max_tokens']} tokens, created {result['created']}",
    ]
    if result.get("bandwidth"):
        lines.append(f"- memory bandwidth (read): {result['bandwidth']['read_gbs']:.1f} GB/s")
    if busy_note(env):
        lines.append(f"- {busy_note(env)}")
    for title, (header, rows) in table_rows(result).items():
        lines += ["", f"## {title}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "|".join("---" for _ in header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    if result.get("skipped"):
        lines += ["", "## Skipped", ""]
        lines += [f"- {key}: {why}" for key, why in result["skipped"].items()]
    return "\n".join(lines) + "\n"


# --- plots -----------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    from cxrlite.fileio import atomic_open

    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    _pyplot().close(fig)
    return Path(path)


def plot_latency(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Stacked p50 phases of each LLM variant's request, and each vision backend's p50."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(result["llm"])
    bottom = np.zeros(len(names))
    for phase in LLM_PHASES:
        values = np.array([_p50(result["llm"][n], phase) or 0.0 for n in names])
        label = PHASE_LABELS.get(phase, phase.removesuffix("_ms"))
        left.bar(names, values, bottom=bottom, label=label)
        bottom += values
    left.set_ylabel("ms (p50)")
    left.set_title(f"request phases, {result['settings']['max_tokens']} tokens")
    left.legend(fontsize=8)
    vnames = list(result["vision"])
    p50 = [_p50(result["vision"][n], "vision_ms") or 0.0 for n in vnames]
    p90 = [result["vision"][n]["vision_ms"]["p90"] or 0.0 for n in vnames]
    right.bar(vnames, p50, yerr=[np.zeros(len(p50)), np.subtract(p90, p50)], capsize=4)
    right.set_ylabel("ms (p50, bar to p90)")
    right.set_title("vision tower, one image")
    for axis in (left, right):
        axis.tick_params(axis="x", rotation=30, labelsize=8)
    return _save(fig, path)


def plot_throughput(loadtest: dict[str, Any], path: str | os.PathLike) -> Path:
    """Throughput (tokens/s, requests/s) and TTFT p50/p99 against concurrency (a loadtest JSON)."""
    plt = _pyplot()
    levels = loadtest["levels"]
    conc = [lv["concurrency"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(conc, [lv["tokens_per_s"] for lv in levels], "o-", label="tokens/s")
    twin = left.twinx()
    twin.plot(conc, [lv["requests_per_s"] for lv in levels], "s--", color="C1", label="requests/s")
    left.set_xlabel("concurrency")
    left.set_ylabel("tokens/s")
    twin.set_ylabel("requests/s")
    left.set_title("throughput")
    handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    left.legend(handles, [h.get_label() for h in handles], loc="lower right")
    for q in ("p50", "p99"):
        right.plot(conc, [lv["ttft_ms"][q] or np.nan for lv in levels], "o-", label=f"TTFT {q}")
    right.set_xlabel("concurrency")
    right.set_ylabel("ms")
    right.set_title("time to first token")
    right.legend()
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(conc, [str(c) for c in conc])
    return _save(fig, path)


def write_outputs(
    result: dict[str, Any], out_dir: str | os.PathLike, loadtest: dict[str, Any] | None = None
) -> dict[str, Path]:
    """bench.json, bench.md and latency.png (+ throughput.png from a loadtest result) in out_dir,
    each written atomically."""
    from cxrlite.fileio import atomic_write_text, write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench.json", "markdown": out / "bench.md"}
    write_json(paths["json"], result)
    atomic_write_text(paths["markdown"], to_markdown(result))
    if result["llm"] or result["vision"]:
        paths["latency_png"] = plot_latency(result, out / "latency.png")
    if loadtest is not None:
        paths["throughput_png"] = plot_throughput(loadtest, out / "throughput.png")
    return paths
