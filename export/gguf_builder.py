"""The GGUF LLM as a bundle part: a builder for export.bundle (create_bundle / export_bundle's
`extra_builders`) that writes llm/llm-<dtype>.gguf in the staging folder and records its
llama.cpp-vs-transformers parity in the manifest."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cxrlite.bundle import Key, Kind, variant_entry


def gguf_builder(
    ckpt_dir: Path, dtype: str, check_parity: bool = True
) -> Callable[[Path], dict[str, Any]]:
    """Bundle builder: the LLM as llm/llm-<dtype>.gguf (variant "gguf-<dtype>", the default LLM),
    with llama.cpp-vs-transformers parity unless `check_parity` is off."""

    def build(staging: Path) -> dict[str, Any]:
        from cxrlite.export.gguf import gguf_parity, write_gguf

        rel = f"llm/llm-{dtype}.gguf"
        path = write_gguf(ckpt_dir, staging / rel, dtype=dtype)
        parity = gguf_parity(ckpt_dir, path) if check_parity else None
        name = f"gguf-{dtype}"
        entry = variant_entry(rel, Kind.GGUF, dtype, path.stat().st_size, parity=parity)
        return {Key.LLM: {name: entry}, Key.DEFAULT: {Key.LLM: name}}

    return build
