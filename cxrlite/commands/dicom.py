"""`cxrlite dicom echo|send`: check a DICOM destination and send it files; and the `--dicom-*`
options of `cxrlite serve` (`with_dicom_options`), which turn on the DICOM listener.

DEST is `dimse://AET@HOST:PORT` (C-ECHO / C-STORE) or `dicomweb+http(s)://HOST:PORT/PATH`
(QIDO-RS / STOW-RS). A failure is one line naming the destination and the problem, exit 1.
All of it needs the `pacs` extra; without it, one line says what to install.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cxrlite.errors import CxrliteError

DEFAULT_AE_TITLE = "CXRLITE"
_DICOM_OPTIONS = ("port", "host", "ae_title", "destination", "allow", "spool", "quiet_seconds",
                  "pdf")  # fmt: skip


def _dicom_files(paths: tuple[Path, ...]) -> list[Path]:
    """Files as given; folders expanded (recursively, sorted) to the DICOM files in them."""
    files = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        for child in sorted(path.rglob("*")):
            if child.is_file() and not child.name.startswith("."):
                with open(child, "rb") as f:
                    if f.read(132)[128:] == b"DICM":
                        files.append(child)
    for file in files:
        with open(file, "rb") as f:
            if f.read(132)[128:] != b"DICM":
                raise CxrliteError(f"{file}: not a DICOM file (no DICM preamble)")
    if not files:
        raise CxrliteError("no DICOM files to send")
    return files


@click.group()
@click.pass_context
def dicom(ctx: click.Context) -> None:
    """DICOM networking helpers: check a destination, send it files.

    \b
    DEST: dimse://AET@HOST:PORT             C-ECHO / C-STORE
          dicomweb+http(s)://HOST:PORT/PATH  QIDO-RS / STOW-RS
    """
    if (ctx.obj or {}).get("verbose", 0) < 2:  # pynetdicom logs what our one line says
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


_ae_option = click.option("--ae-title", default=DEFAULT_AE_TITLE, show_default=True,
                          help="Our (calling) AE title.")  # fmt: skip
_timeout_option = click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                               default=10.0, show_default=True, help="Seconds per step.")  # fmt: skip


@dicom.command()
@click.argument("destination", metavar="DEST")
@_ae_option
@_timeout_option
def echo(destination: str, ae_title: str, timeout: float) -> None:
    """C-ECHO DEST (or query a DICOMweb service): prints the status and the round trip."""
    from cxrlite.pacs.destinations import echo as echo_destination
    from cxrlite.pacs.destinations import parse_destination, require_pacs_extra

    require_pacs_extra("cxrlite dicom")
    dest = parse_destination(destination)
    status, ms = echo_destination(dest, calling_ae=ae_title, timeout_s=timeout)
    click.echo(f"{dest.label}: {status}, round trip {ms:.1f} ms")


@dicom.command()
@click.argument("files", metavar="FILE...", nargs=-1, required=True,
                type=click.Path(exists=True, path_type=Path))  # fmt: skip
@click.argument("destination", metavar="DEST")
@_ae_option
@_timeout_option
def send(files: tuple[Path, ...], destination: str, ae_title: str, timeout: float) -> None:
    """Send DICOM files (folders: the DICOM files in them) to DEST: C-STORE on one
    association, or one STOW-RS request."""
    from cxrlite.pacs.destinations import parse_destination, require_pacs_extra, send_files

    require_pacs_extra("cxrlite dicom")
    dest = parse_destination(destination)
    paths = _dicom_files(files)
    t0 = time.perf_counter()
    results = send_files(dest, paths, calling_ae=ae_title, timeout_s=timeout)
    ms = (time.perf_counter() - t0) * 1000
    failed = [(path, problem) for path, problem in zip(paths, results, strict=True) if problem]
    for path, problem in failed:
        click.echo(f"{path}: {problem}", err=True)
    if failed:
        raise CxrliteError(f"{dest.label}: {len(failed)} of {len(paths)} files not stored")
    click.echo(f"{dest.label}: stored {len(paths)} file(s) in {ms:.0f} ms")


# --- `cxrlite serve --dicom-*` ---------------------------------------------------------------

_SERVE_OPTIONS = [
    click.option("--dicom-port", type=click.IntRange(0, 65535), default=None,
                 help="Also listen for DICOM (C-STORE, C-ECHO) on this port; 0: a free one."),
    click.option("--dicom-host", default=None,
                 help="Address of the DICOM listener (default: --host)."),
    click.option("--dicom-ae-title", default=DEFAULT_AE_TITLE, show_default=True,
                 help="Our AE title; associations calling another are rejected."),
    click.option("--dicom-destination", multiple=True, metavar="DEST",
                 help="Where SRs go (repeatable): dimse://AET@HOST:PORT or "
                 "dicomweb+http(s)://HOST:PORT/PATH."),
    click.option("--dicom-allow", multiple=True, metavar="AET@HOST",
                 help="Only these callers (repeatable): AET@HOST, AET (any host), *@HOST."),
    click.option("--dicom-spool", type=click.Path(file_okay=False, path_type=Path),
                 default=None, help="Spool and outbox folder (default: "
                 "$XDG_STATE_HOME/cxrlite/dicom, or ~/.local/state/cxrlite/dicom)."),
    click.option("--dicom-quiet-seconds", type=click.FloatRange(min=0), default=10.0,
                 show_default=True, help="Wait this long after a study's last instance "
                 "before reporting it."),
    click.option("--dicom-pdf", is_flag=True,
                 help="Also send an Encapsulated PDF of each report."),
]  # fmt: skip


def with_dicom_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the `--dicom-*` options to `cxrlite serve`; it receives them as one `dicom` argument:
    the options' values by name ({} when none was given)."""

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(f"dicom_{name}") for name in _DICOM_OPTIONS}
        return fn(*args, dicom=values, **kwargs)

    for option in reversed(_SERVE_OPTIONS):
        command = option(command)
    return command


def dicom_settings(values: dict[str, Any], host: str) -> Any:
    """The DicomSettings of `--dicom-*` (None without --dicom-port), its port checked free."""
    if values["port"] is None:
        given = [f"--dicom-{k.replace('_', '-')}" for k in ("destination", "allow", "spool")
                 if values[k]] + (["--dicom-pdf"] if values["pdf"] else [])  # fmt: skip
        if given:
            raise click.UsageError(f"{', '.join(given)} needs --dicom-port")
        return None
    from cxrlite.pacs.destinations import require_pacs_extra
    from cxrlite.pacs.service import DicomSettings, default_spool_dir

    require_pacs_extra("--dicom-port")
    settings = DicomSettings(
        port=values["port"],
        host=values["host"] or host,
        ae_title=values["ae_title"],
        destinations=tuple(values["destination"]),
        allow=tuple(values["allow"]),
        spool_dir=values["spool"] or default_spool_dir(),
        quiet_s=values["quiet_seconds"],
        pdf=values["pdf"],
    )
    check_port_free(settings.host, settings.port)
    from cxrlite.pacs.spool import private_dir

    private_dir(settings.spool_dir)  # not writable: one line now, not at startup
    return settings


def check_port_free(host: str, port: int) -> None:
    """Fail in one line, before the model loads, when the DICOM port is taken."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as e:
            raise CxrliteError(
                f"cannot listen for DICOM on {host}:{port}: {e.strerror or e}"
            ) from None
