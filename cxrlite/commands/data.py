"""`cxrlite data ...`: phantoms, inspection, labels, instruction tasks, dataset import."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from cxrlite.progress import progress_bar


@click.group()
def data() -> None:
    """Make phantom radiographs, inspect DICOM/PNG/JPEG files, label reports, build tasks."""


@data.command()
@click.option("--n", "n", type=click.IntRange(1), required=True, help="Number of studies.")
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same phantoms.")
@click.option(
    "--size",
    type=click.IntRange(64, 2048),
    default=256,
    show_default=True,
    help="Image side in pixels.",
)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True, help="Processes.")
def phantoms(n: int, out: Path, seed: int, size: int, workers: int) -> None:
    """Write N synthetic chest radiographs with known findings, reports and CheXpert labels.

    OUT gets images/<id>.png, manifest.jsonl (one study a line, with its split) and phantoms.json.
    """
    from cxrlite.phantoms.generator import generate_phantoms

    t0 = time.perf_counter()
    with progress_bar("phantoms", total=n) as advance:
        done_so_far = [0]

        def on_progress(done: int, total: int) -> None:
            advance(done - done_so_far[0])
            done_so_far[0] = done

        studies = generate_phantoms(
            out, n, seed=seed, size=size, workers=workers, progress=on_progress
        )
    dt = time.perf_counter() - t0
    splits = {s: sum(st.split == s for st in studies) for s in ("train", "validate", "test")}
    click.echo(
        f"wrote {len(studies)} phantoms to {out} in {dt:.1f} s ({len(studies) / dt:.0f}/s); splits {splits}"
    )


@data.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PNG to write."
)
@click.option(
    "--n",
    "n",
    type=click.IntRange(1, 200),
    default=24,
    show_default=True,
    help="Studies on the sheet.",
)
@click.option("--cols", type=click.IntRange(1, 20), default=6, show_default=True)
def show(directory: Path, out: Path, n: int, cols: int) -> None:
    """Write a contact sheet of the phantoms in DIRECTORY with their labels."""
    from cxrlite.data.datasets import load_dataset
    from cxrlite.phantoms.sheet import contact_sheet

    studies = load_dataset("phantom", directory)[:n]
    contact_sheet(studies, directory, out, cols=cols)
    click.echo(f"wrote {out} ({len(studies)} studies)")


@data.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--png",
    "png_out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the preprocessed image (what the model sees): a .png path for one file, else a folder.",
)
@click.option(
    "--image-size",
    type=click.IntRange(16, 4096),
    default=224,
    show_default=True,
    help="Model input size used for --png.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def inspect(files: tuple[Path, ...], png_out: Path | None, image_size: int, as_json: bool) -> None:
    """Print what was read from each DICOM/PNG/JPEG file (format, modality, photometric
    interpretation, bits stored, size, transfer syntax, window applied) or why it failed.
    Prints no patient identifiers. Exits 1 if any file failed."""
    from cxrlite.imaging.decode import inspect_image, load_image
    from cxrlite.imaging.errors import ImageError
    from cxrlite.imaging.preprocess import PreprocessConfig, preprocess, to_display_png

    cfg = PreprocessConfig(image_size=image_size)
    failed = 0
    for path in files:
        try:
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            image = load_image(path)
            info = inspect_image(image)
            if png_out is not None:
                one_png = len(files) == 1 and png_out.suffix.lower() == ".png"
                target = png_out if one_png else png_out / f"{path.stem}.png"
                to_display_png(preprocess(image.pixels, cfg), target, cfg)
                info["png"] = str(target)
            row = {"file": str(path), "ok": True, **info}
        except (ImageError, OSError) as e:
            failed += 1
            row = {
                "file": str(path),
                "ok": False,
                "error": getattr(e, "code", type(e).__name__),
                "message": str(e),
            }
        if as_json:
            click.echo(json.dumps(row, default=str))
        elif row["ok"]:
            details = ", ".join(
                f"{k}={v}"
                for k, v in row.items()
                if k not in ("file", "ok") and v not in (None, [], "")
            )
            click.echo(f"{path}: {details}")
        else:
            click.echo(f"{path}: ERROR {row['error']}: {row['message']}", err=True)
    if failed:
        sys.exit(1)


@data.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="JSONL to write."
)
@click.option(
    "--explain",
    is_flag=True,
    help="Also record, and print, why: each phrase matched, the rule and cue, and its scope.",
)
def label(source: Path, out: Path, explain: bool) -> None:
    """Label report texts with the 14 CheXpert observations.

    SOURCE is a .txt file (one report per line) or JSONL with `id` and `text`. Writes one
    {"id": ..., "labels": {...}} per report (with --explain, its "decisions" too).
    """
    from cxrlite.eval.label_files import label_file

    records = label_file(source, out, explain=explain)
    if explain:
        for record in records:
            click.echo(f"[{record['id']}]")
            for d in record["decisions"]:
                cue = f' (cue "{d["cue"]}")' if d["cue"] else ""
                click.echo(
                    f'  {d["observation"]}: {d["value"]} <- "{d["phrase"]}" by {d["rule"]}{cue}'
                    f' in "{d["scope"]}"'
                )
    click.echo(f"labeled {len(records)} reports -> {out}")


@data.command("import")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--layout",
    default=None,
    help="Dataset layout (default: detected). One of: mimic-cxr-jpg, "
    "chexpert, iu-xray, padchest, jsonl, phantom.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Study manifest JSONL.",
)
def import_(root: Path, layout: str | None, out: Path) -> None:
    """Turn a published dataset layout under ROOT into a cxrlite study manifest (JSONL)."""
    from cxrlite.data.datasets import detect_layout, load_dataset
    from cxrlite.fileio import write_jsonl

    layout = layout or detect_layout(root)
    studies = load_dataset(layout, root)
    n = write_jsonl(out, (s.to_dict() for s in studies))
    click.echo(f"{layout}: {n} studies -> {out}")


@data.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Task JSONL to write.",
)
@click.option(
    "--layout",
    default=None,
    help="Layout of SOURCE when it is a dataset folder (default: detected).",
)
@click.option("--seed", type=int, default=0, show_default=True)
def tasks(source: Path, out: Path, layout: str | None, seed: int) -> None:
    """Build CheXinstruct-style instruction tasks from a dataset folder or a study manifest."""
    from cxrlite.data.datasets import detect_layout, load_dataset
    from cxrlite.data.tasks import build_tasks, write_tasks

    if source.is_dir():
        studies = load_dataset(layout or detect_layout(source), source)
    else:
        studies = load_dataset("jsonl", source)
    records = build_tasks(studies, seed=seed)
    write_tasks(out, records)
    counts: dict[str, int] = {}
    for r in records:
        counts[r.task] = counts.get(r.task, 0) + 1
    click.echo(f"{len(records)} task records -> {out}")
    for task, count in sorted(counts.items()):
        click.echo(f"  {task}: {count}")


@data.command("dicom")
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="DICOM file to write.",
)
@click.option(
    "--monochrome1", is_flag=True, help="Store inverted (MONOCHROME1), as some CR systems do."
)
def dicom(image: Path, out: Path, monochrome1: bool) -> None:
    """Wrap a PNG/JPEG (e.g. a phantom) into a 12-bit DX DICOM with synthetic identifiers,
    to try the DICOM path end to end."""
    from cxrlite.imaging.write import image_to_dicom

    click.echo(f"wrote {image_to_dicom(image, out, monochrome1)}")
