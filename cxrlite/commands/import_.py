"""`cxrlite import`: a published chest X-ray model on this disk -> a verified bundle.

Nothing is downloaded: the user obtains the files under the model's licence (README, "Deploy a
published model"). Each family is one subcommand.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cxrlite.commands.export import echo_variants


def _summary(bundle: Any, checkpoint: Path) -> None:
    record = bundle.provenance
    click.echo(f"bundle {bundle.path} ({record['model']}; {record['license']})")
    click.echo(f"  checkpoint {checkpoint} (the PyTorch reference for eval, quantize, GPTQ)")
    echo_variants(bundle)


def _common(fn: Any) -> Any:
    options = [
        click.option("--out", type=click.Path(path_type=Path), required=True,
                     help="The bundle folder to write."),
        click.option("--checkpoint-out", type=click.Path(path_type=Path), default=None,
                     help="Where the converted cxrlite checkpoint goes (default: OUT-checkpoint)."),
        click.option("--accept-license", is_flag=True,
                     help="Confirm you hold the model under its licence and accept its terms "
                          "(printed when this is missing; README lists them)."),
        click.option("--revision", default=None,
                     help="The model revision you downloaded, recorded in the manifest."),
        click.option("--overwrite", is_flag=True, help="Replace an existing bundle at OUT."),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group("import")
def import_group() -> None:
    """Convert a published CXR model held on this disk into a bundle (ONNX vision tower, GGUF
    LLM, tokenizer, the model's own prompt and preprocessing, parity figures, provenance).
    `cxrlite quantize`, `report`, `serve`, `bench` and `eval` then work on it."""


@import_group.command("llava-rad")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--base", type=click.Path(path_type=Path), required=True,
              help="The base LLM folder LLaVA-Rad was trained on: lmsys/vicuna-7b-v1.5.")  # fmt: skip
@_common
def llava_rad(src: Path, base: Path, out: Path, checkpoint_out: Path | None,
              accept_license: bool, revision: str | None, overwrite: bool) -> None:  # fmt: skip
    """LLaVA-Rad with its Vicuna base. SRC: the microsoft/llava-rad folder (config.json,
    adapter_model.bin, non_lora_trainables.bin, biomedclipcxr_518.json and its checkpoint)."""
    from cxrlite.export.importers.common import default_checkpoint_out
    from cxrlite.export.importers.llava_rad import import_llava_rad

    checkpoint_out = checkpoint_out or default_checkpoint_out(out)
    bundle = import_llava_rad(
        src, base, out, accept_license=accept_license, checkpoint_out=checkpoint_out,
        revision=revision, overwrite=overwrite,
    )  # fmt: skip
    _summary(bundle, checkpoint_out)


@import_group.command("maira-2")
@click.argument("src", type=click.Path(path_type=Path))
@_common
def maira2(src: Path, out: Path, checkpoint_out: Path | None, accept_license: bool,
           revision: str | None, overwrite: bool) -> None:  # fmt: skip
    """MAIRA-2, the findings of a frontal image. SRC: the microsoft/maira-2 folder (config.json,
    model-*.safetensors and index, tokenizer files, chat_template.json, preprocessor_config.json);
    its own code is never run."""
    from cxrlite.export.importers.common import default_checkpoint_out
    from cxrlite.export.importers.maira2 import import_maira2

    checkpoint_out = checkpoint_out or default_checkpoint_out(out)
    bundle = import_maira2(
        src, out, accept_license=accept_license, checkpoint_out=checkpoint_out,
        revision=revision, overwrite=overwrite,
    )  # fmt: skip
    _summary(bundle, checkpoint_out)


@import_group.command("cxr-llava")
@click.argument("src", type=click.Path(path_type=Path))
@_common
def cxr_llava(src: Path, out: Path, checkpoint_out: Path | None, accept_license: bool,
              revision: str | None, overwrite: bool) -> None:  # fmt: skip
    """CXR-LLaVA v2, its radiologic report. SRC: the ECOFRI/CXR-LLAVA-v2 folder (config.json,
    model-*.safetensors and index, tokenizer.model, tokenizer_config.json); its own code is never
    run."""
    from cxrlite.export.importers.common import default_checkpoint_out
    from cxrlite.export.importers.cxr_llava import import_cxr_llava

    checkpoint_out = checkpoint_out or default_checkpoint_out(out)
    bundle = import_cxr_llava(
        src, out, accept_license=accept_license, checkpoint_out=checkpoint_out,
        revision=revision, overwrite=overwrite,
    )  # fmt: skip
    _summary(bundle, checkpoint_out)


@import_group.command("medgemma")
@click.argument("src", type=click.Path(path_type=Path))
@_common
def medgemma(src: Path, out: Path, checkpoint_out: Path | None, accept_license: bool,
             revision: str | None, overwrite: bool) -> None:  # fmt: skip
    """MedGemma 4B-it, a report of a chest X-ray. SRC: the google/medgemma-4b-it folder
    (config.json, model-*.safetensors and index, tokenizer.model and tokenizer files,
    chat_template.json, preprocessor_config.json). The LLM runs as llama.cpp's gemma3."""
    from cxrlite.export.importers.common import default_checkpoint_out
    from cxrlite.export.importers.medgemma import import_medgemma

    checkpoint_out = checkpoint_out or default_checkpoint_out(out)
    bundle = import_medgemma(
        src, out, accept_license=accept_license, checkpoint_out=checkpoint_out,
        revision=revision, overwrite=overwrite,
    )  # fmt: skip
    _summary(bundle, checkpoint_out)
