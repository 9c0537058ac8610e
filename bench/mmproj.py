"""The vision tower of a cxrlite checkpoint as llama.cpp's multimodal projector file (mmproj), made
by llama.cpp's own converter, so `llama-server --mmproj` runs the same vision weights as the
cxrlite bundle: the peer in `cxrlite bench compare --llama-server`.

    cxrlite bench mmproj CHECKPOINT --llama-cpp LLAMA_CPP_DIR --out mmproj.gguf

llama.cpp's `convert_hf_to_gguf.py --mmproj` reads a transformers folder, so the checkpoint's
vision tower and projector are first written as one, in the layout of the published model they
come from (MedGemma's Gemma3ForConditionalGeneration: `vision_tower.vision_model.*`,
`multi_modal_projector.*`, with its config.json and preprocessor_config.json). Writing the mmproj
GGUF ourselves would be a second converter to keep in step with llama.cpp's clip loader; using
theirs makes the comparison about the servers, not about conversions.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from cxrlite.errors import CxrliteError
from cxrlite.fileio import write_json


class MmprojError(CxrliteError, RuntimeError):
    """The mmproj file could not be made; the message says which step failed."""


def _rgb(value: float | list[float]) -> list[float]:
    """A preprocessing mean or std (one value or one per channel) for three channels."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return values * (3 // len(values))


def _gemma3_folder(cfg: Any, state: dict[str, Any], out: Path) -> None:
    """MedGemma's layout of the vision part: config, preprocessor config, safetensors."""
    from safetensors.torch import save_file

    v = cfg.vision
    write_json(out / "config.json", {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "mm_tokens_per_image": cfg.bridger.tokens_per_image,
        "image_token_index": cfg.image_token_id,
        "text_config": {"model_type": "gemma3_text", "hidden_size": cfg.llm.hidden_size},
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "image_size": v.image_size, "patch_size": v.patch_size,
            "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_heads,
            "num_hidden_layers": v.num_layers, "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps or 1e-6, "vision_use_head": False,
        },
    })  # fmt: skip
    pre = cfg.preprocess
    write_json(out / "preprocessor_config.json", {
        "image_processor_type": "Gemma3ImageProcessor", "do_resize": True, "resample": 2,
        "size": {"height": v.image_size, "width": v.image_size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": _rgb(pre["mean"]),
        "image_std": _rgb(pre["std"]),
        "image_seq_length": cfg.bridger.tokens_per_image,
    })  # fmt: skip
    renamed = {}
    for key, tensor in state.items():
        if key.startswith("vision."):
            renamed["vision_tower.vision_model." + key.removeprefix("vision.")] = tensor
        elif key.startswith("bridger."):
            renamed["multi_modal_projector." + key.removeprefix("bridger.")] = tensor
    save_file(renamed, str(out / "model.safetensors"), metadata={"format": "pt"})


# bridger kind -> writer of the transformers folder llama.cpp's converter reads
FOLDER_WRITERS = {"gemma3": _gemma3_folder}


def write_mmproj(
    ckpt_dir: str | os.PathLike, llama_cpp_dir: str | os.PathLike, out: str | os.PathLike
) -> Path:
    """llama.cpp's mmproj (f16) of the checkpoint's vision tower, through its converter."""
    from cxrlite.model.checkpoint import load_config, load_weights

    cfg = load_config(ckpt_dir)
    writer = FOLDER_WRITERS.get(cfg.bridger.kind)
    if writer is None:
        raise MmprojError(
            f"{ckpt_dir}: no mmproj layout for a {cfg.bridger.kind} bridger ({sorted(FOLDER_WRITERS)})"
        )
    converter = Path(llama_cpp_dir) / "convert_hf_to_gguf.py"
    if not converter.is_file():
        raise MmprojError(f"{llama_cpp_dir}: no convert_hf_to_gguf.py (a llama.cpp source tree)")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="cxrlite-mmproj-") as tmp:
        writer(cfg, load_weights(ckpt_dir), Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(Path(llama_cpp_dir) / "gguf-py")}
        command = [sys.executable, str(converter), tmp, "--mmproj", "--outtype", "f16",
                   "--outfile", str(out)]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise MmprojError(f"llama.cpp's converter failed ({done.returncode}): {' | '.join(tail)}")
    return out


@click.command("mmproj")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--llama-cpp",
    "llama_cpp_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A llama.cpp source tree (its convert_hf_to_gguf.py and gguf-py).",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The mmproj GGUF to write.",
)
def mmproj_command(checkpoint: Path, llama_cpp_dir: Path, out: Path) -> None:  # fmt: skip
    """The checkpoint's vision tower and projector as llama.cpp's mmproj (f16), written by
    llama.cpp's own converter, for `cxrlite bench compare --llama-server ... --mmproj`."""
    click.echo(write_mmproj(checkpoint, llama_cpp_dir, out))
