"""The one `cxrlite` entry point. Subcommand groups live in `cxrlite.commands`, imported lazily
so `cxrlite --help` stays fast (torch and transformers load only when a command needs them)."""

from __future__ import annotations

import importlib
import logging

import click

from cxrlite import __version__
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

# Errors a user can cause (bad file, option, bundle or data): one line and exit code 1, from
# every command. Anything else is a bug and keeps its traceback. ValueError stays here because
# configs validate themselves with it (a hand-edited config.json names the bad field).
USER_ERRORS: tuple[type[BaseException], ...] = (
    CxrliteError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)

# name -> (module, attribute, one-line help), in pipeline order (as `cxrlite --help` lists them).
# A command exists here only once it is real.
# fmt: off
_COMMANDS = {
    "data": ("cxrlite.commands.data", "data", "Phantoms, DICOM/PNG inspection, report labels, instruction tasks."),
    "train": ("cxrlite.commands.train", "train", "Train the model: CheXagent's four stages or LLaVA-Rad's two."),
    "import": ("cxrlite.commands.import_", "import_group", "Published CXR models on this disk (LLaVA-Rad, MAIRA-2) -> a bundle, parity-checked."),
    "export": ("cxrlite.commands.export", "export", "Checkpoint -> bundle: ONNX vision tower (+TensorRT), GGUF LLM."),
    "quantize": ("cxrlite.commands.quantize", "quantize", "Add quantized LLM variants (GGUF q8_0/q4_k_m..., GPTQ) to a bundle."),
    "eval": ("cxrlite.commands.eval", "eval_command", "CheXbench-style evaluation with bootstrap CIs and fairness, per bundle variant."),
    "report": ("cxrlite.commands.report", "report", "Draft reports (findings, impression, labels) for DICOM/PNG/JPEG files or folders."),
    "serve": ("cxrlite.commands.serve", "serve", "Serve a bundle: OpenAI-compatible API, /v1/reports, /health, /metrics, a web page."),
    "dicom": ("cxrlite.commands.dicom", "dicom", "DICOM helpers: C-ECHO a PACS or DICOMweb destination, send it files."),
    "bench": ("cxrlite.commands.bench", "bench", "Latency per phase and backend (default), servers under load, soak, micro-benchmarks."),
    "doctor": ("cxrlite.commands.doctor", "doctor", "What this machine can run, and what is missing for which feature."),
}
# fmt: on


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(_COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in _COMMANDS:
            return None
        module, attr, _ = _COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            logger.debug("details", exc_info=True)  # -vv shows where it came from
            raise click.ClickException(str(e) or type(e).__name__) from None

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in _COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def setup_logging(verbosity: int) -> None:
    """Quiet by default (warnings only); -v info, -vv debug."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging: -v info, -vv debug.")
@click.version_option(__version__, prog_name="cxrlite")
@click.pass_context
def main(ctx: click.Context, verbose: int) -> None:
    """cxrlite: a chest X-ray vision-language model from training to a fast, safe service.

    \b
    Data flow:
      cxrlite data phantoms   make labeled synthetic radiographs (tests, demo)
      cxrlite train           train the model (four-stage recipe) on a dataset folder
      cxrlite import          or convert a published model held on this disk (LLaVA-Rad, MAIRA-2)
      cxrlite export          checkpoint -> deployment bundle (ONNX + GGUF), parity-checked
      cxrlite quantize        add llama.cpp / GPTQ variants to the bundle, quality-gated
      cxrlite eval            quality with bootstrap CIs and fairness, checkpoint vs variants
      cxrlite report          draft reports for DICOM/PNG/JPEG files with a bundle
      cxrlite serve           OpenAI-compatible server with a web page, health and metrics
      cxrlite bench           latency per phase and backend; `cxrlite bench --help` lists the rest
      cxrlite doctor          check what this machine can run
    """
    setup_logging(verbose)
    ctx.ensure_object(dict)["verbose"] = verbose


if __name__ == "__main__":
    main()
