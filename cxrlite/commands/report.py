"""`cxrlite report`: draft reports for radiographs (DICOM, PNG, JPEG) from a bundle."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from cxrlite.commands import RuntimeOptions, with_runtime_options
from cxrlite.progress import progress_bar

logger = logging.getLogger(__name__)

# Files in a folder are taken when their content is DICOM/PNG/JPEG, or when their name says
# they should be (so a corrupt "x.png" is reported as bad rather than silently passed over).
IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}
_SNIFF_BYTES = 132  # DICOM's preamble + "DICM"


def _looks_like_image(path: Path) -> bool:
    from cxrlite.imaging.decode import sniff_format

    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            return sniff_format(f.read(_SNIFF_BYTES)) is not None
    except OSError:
        return True  # unreadable: let the report say so


def expand_inputs(paths: tuple[Path, ...]) -> tuple[list[Path], int]:
    """Files as given, folders expanded (recursively, sorted, hidden files left out) to their
    images; returns (files, number of non-image files passed over)."""
    files, skipped = [], 0
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        for child in sorted(path.rglob("*")):
            rel = child.relative_to(path).parts
            if not child.is_file() or any(part.startswith(".") for part in rel):
                continue
            if _looks_like_image(child):
                files.append(child)
            else:
                skipped += 1
    return files, skipped


CLI_OVERRIDE = "pass --allow-non-chest to report anyway"


def refuse_non_chest(files: list[Path]) -> None:
    """One line naming the first DICOM file that is not a chest radiograph (and how many more),
    before any model loads; PNG and JPEG carry no metadata and pass."""
    from cxrlite.pacs.chest import NotChestRadiographError, check_chest_radiograph

    refused = []
    for file in files:
        try:
            check_chest_radiograph(file, label=str(file), override=CLI_OVERRIDE)
        except NotChestRadiographError as e:
            refused.append(e)
    if refused:
        more = f" ({len(refused) - 1} more file(s) refused)" if len(refused) > 1 else ""
        raise click.ClickException(f"{refused[0]}{more}")


def dicom_source(files: list[Path], sr_out: Path | None, pdf_out: Path | None) -> Any:
    """The one DICOM input that --sr / --pdf report on, read without its pixels."""
    from cxrlite.pacs import sr
    from cxrlite.pacs.chest import read_dicom_header

    if sr_out is not None and sr.hd is None:
        raise click.ClickException(f"--sr needs the pacs extra: {sr.PACS_EXTRA}")
    if len(files) != 1:
        raise click.ClickException(f"--sr and --pdf take one DICOM input, not {len(files)} files")
    source = read_dicom_header(files[0])
    if source is None or "SOPInstanceUID" not in source or "StudyInstanceUID" not in source:
        raise click.ClickException(f"{files[0]}: --sr and --pdf need a DICOM input")
    return source


def write_dicom_outputs(
    source: Any,
    result: dict[str, Any],
    model: dict[str, Any],
    sr_out: Path | None,
    pdf_out: Path | None,
) -> None:
    """The SR and the PDF (raw for a .pdf name, else Encapsulated PDF), written atomically."""
    from cxrlite.fileio import atomic_write_bytes
    from cxrlite.pacs.pdf import build_report_pdf, encapsulated_pdf
    from cxrlite.pacs.sr import build_report_sr, part10_bytes

    if sr_out is not None:
        atomic_write_bytes(sr_out, part10_bytes(build_report_sr(source, result, model=model)))
        click.echo(f"wrote {sr_out} (DICOM SR, unverified draft)", err=True)
    if pdf_out is not None:
        pdf = build_report_pdf(source, result, model=model)
        if pdf_out.suffix.lower() != ".pdf":
            pdf = part10_bytes(encapsulated_pdf(source, pdf, model=model))
        atomic_write_bytes(pdf_out, pdf)
        click.echo(f"wrote {pdf_out} (PDF, unverified draft)", err=True)


def _text_report(file: Path, result: dict[str, Any]) -> str:
    groups: dict[str, list[str]] = {}
    for name, value in result["labels"].items():
        if value in ("positive", "uncertain"):
            groups.setdefault(value, []).append(name)
    labels = "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items()) or "none positive"
    impression = result["impression"]
    if impression is None:
        impression = "(none: " + "; ".join(result.get("notes", [])) + ")"
    return (
        f"{file}\n  FINDINGS: {result['findings']}\n  IMPRESSION: {impression}\n"
        f"  labels: {labels}\n  ({result['timings']['total_ms']:.0f} ms)"
    )


def _reports(
    runtime: Any, files: list[Path], max_tokens: int, as_json: bool, failed: list[Path]
) -> Iterator[dict[str, Any]]:
    """Each readable file's report, echoed as it comes (JSON or text); an unreadable one is
    reported on stderr and appended to `failed`."""
    from cxrlite.imaging.errors import ImageError

    enabled = None if len(files) > 1 else False

    def one(file: Path) -> tuple[Path, dict[str, Any] | None, ImageError | None]:
        try:
            return file, {"file": str(file), **runtime.report(file, max_tokens=max_tokens)}, None
        except ImageError as e:
            return file, None, e

    with progress_bar("report", total=len(files), enabled=enabled) as advance:
        # a folder is a batch: up to the runtime's slots of studies decoded together, in order
        for file, result, error in runtime.map(one, files):
            if error is not None:
                failed.append(file)
                click.echo(f"error: {file}: [{error.code}] {error.problem}", err=True)
                advance(failed=len(failed))
                continue
            click.echo(
                json.dumps(result, ensure_ascii=False) if as_json else _text_report(file, result)
            )
            advance(failed=len(failed))
            yield result


def _keep_last(results: Iterator[dict[str, Any]], last: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for result in results:
        last.clear()
        last.update(result)
        yield result


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--bundle",
    "bundle_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="Bundle folder from `cxrlite export`.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image on stdout.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the results as JSONL (written atomically at the end).",
)
@click.option(
    "--sr",
    "sr_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the report as a DICOM Comprehensive SR in the input's study (one DICOM "
    "input; needs the pacs extra).",
)
@click.option(
    "--pdf",
    "pdf_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write a one-page PDF: a .pdf file, or any other name for an Encapsulated PDF "
    "DICOM instance in the input's study (one DICOM input).",
)
@click.option(
    "--allow-non-chest",
    is_flag=True,
    help="Report DICOM inputs that the chest-radiograph check refuses (modality, body part, "
    "size, ...).",
)
@with_runtime_options
@click.option(
    "--max-tokens",
    type=click.IntRange(1, 4096),
    default=128,
    show_default=True,
    help="Longest findings / impression, in tokens.",
)
@click.pass_context
def report(ctx: click.Context, images: tuple[Path, ...], bundle_dir: Path, as_json: bool,
           out: Path | None, sr_out: Path | None, pdf_out: Path | None, allow_non_chest: bool,
           runtime_options: RuntimeOptions, max_tokens: int) -> None:  # fmt: skip
    """Write a draft report (findings, impression, CheXpert labels) for each IMAGE: DICOM, PNG
    or JPEG files, or folders of them. Unreadable images are reported on stderr and skipped;
    the exit code is 1 if any failed. A DICOM file that is not a chest radiograph stops the
    command before the model loads, unless --allow-non-chest."""
    from cxrlite.fileio import write_jsonl

    files, skipped = expand_inputs(images)
    if skipped:
        click.echo(f"passed over {skipped} non-image file(s)", err=True)
    if not files:
        raise click.ClickException("no images found")
    source = dicom_source(files, sr_out, pdf_out) if sr_out or pdf_out else None
    if not allow_non_chest:
        refuse_non_chest(files)
    # One image: a warm-up would only add to its wait.
    runtime = runtime_options.open(bundle_dir, warmup=len(files) > 1)
    failed: list[Path] = []
    started = time.perf_counter()
    last: dict[str, Any] = {}  # the report --sr / --pdf write
    results = _keep_last(_reports(runtime, files, max_tokens, as_json, failed), last)
    try:
        if out is not None:
            write_jsonl(out, results)
        else:
            for _ in results:
                pass
        if source is not None and last:
            from cxrlite.pacs.sr import model_identity

            write_dicom_outputs(source, last, model_identity(runtime.bundle), sr_out, pdf_out)
    finally:
        runtime.close()
    elapsed = time.perf_counter() - started
    logger.info(
        "reported %d image(s), %d failed, in %.1f s", len(files) - len(failed), len(failed), elapsed
    )
    if failed:
        click.echo(f"{len(failed)} of {len(files)} image(s) failed", err=True)
        ctx.exit(1)
