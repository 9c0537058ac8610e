"""`cxrlite serve`: a bundle behind an OpenAI-compatible HTTP API (see cxrlite.server).

The model loads in the background while the server listens (/health answers 503 until it is
ready). A bundle that fails to load ends the process with exit code 1 and one line naming the
bundle and the problem, so a supervisor (systemd, a container runtime) restarts it or alerts,
instead of keeping a server that can only answer 503.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cxrlite.commands import RuntimeOptions, with_runtime_options
from cxrlite.commands.dicom import dicom_settings, with_dicom_options
from cxrlite.errors import CxrliteError
from cxrlite.server.settings import ServerSettings

logger = logging.getLogger(__name__)

DEFAULTS = ServerSettings()


def setting_option(flag: str, field: str, **kwargs: Any) -> Callable[..., Any]:
    """An option for the ServerSettings field `field`, its default taken from ServerSettings."""
    default = getattr(DEFAULTS, field)
    return click.option(flag, field, default=default, show_default=bool(default), **kwargs)


def load_failure(bundle_dir: Path, error: BaseException) -> str:
    """One line naming the bundle and what is wrong with it."""
    problem = str(error) if isinstance(error, CxrliteError) else f"{type(error).__name__}: {error}"
    if str(bundle_dir) not in problem:
        problem = f"{bundle_dir}: {problem}"
    return " ".join(f"cannot serve {problem}".split())


def run_server(app_for: Callable[..., Any], host: str, port: int) -> BaseException | None:
    """Run uvicorn until a signal stops it or the model fails to load; the load error if so.
    `app_for(on_load_error=...)` makes the app."""
    import uvicorn

    failures: list[BaseException] = []

    def stop(error: BaseException) -> None:
        failures.append(error)
        server.should_exit = True  # uvicorn shuts down gracefully, as on Ctrl-C

    config = uvicorn.Config(
        app_for(on_load_error=stop),
        host=host,
        port=port,
        log_config=None,  # keep the CLI's logging format
        access_log=False,  # our own request lines carry the id, timings and token counts
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    # As uvicorn.run: Ctrl-C ends the server gracefully (uvicorn re-raises the signal after
    # shutting down), and a server that never started exits with uvicorn's startup-failure code.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if failures:
        return failures[0]
    if not server.started:
        sys.exit(uvicorn.server.STARTUP_FAILURE)
    return None


def warn_about(host: str, settings: ServerSettings) -> None:
    from cxrlite.server.security import exposure_warning

    warning = exposure_warning(host, settings.api_key)
    if warning:
        logger.warning(warning)
        click.echo(f"warning: {warning}", err=True)
    if settings.log_phi:
        click.echo("warning: --log-phi writes prompts and reports to the log", err=True)


@click.command()
@click.argument(
    "bundle_dir", metavar="BUNDLE", type=click.Path(exists=True, file_okay=False, path_type=Path)
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; loopback only unless changed.",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@setting_option(
    "--api-key",
    "api_key",
    envvar="CXRLITE_API_KEY",
    show_envvar=True,
    callback=lambda ctx, param, value: value or None,  # an empty variable sets no key
    help="Require 'Authorization: Bearer KEY' (prefer the environment variable: "
    "command lines are visible to other users).",
)
@setting_option(
    "--max-queue",
    "max_queue",
    type=click.IntRange(1),
    help="Requests waiting for the model before new ones get 503.",
)
@setting_option(
    "--request-timeout",
    "request_timeout_s",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds per request, queue included, before 504.",
)
@setting_option(
    "--max-tokens-cap",
    "max_tokens_cap",
    type=click.IntRange(1),
    help="Most tokens one request may generate (and the default max_tokens).",
)
@setting_option(
    "--max-body-mb",
    "max_body_mb",
    type=click.FloatRange(min=0, min_open=True),
    help="Largest request body (413 beyond).",
)
@setting_option(
    "--max-pixels",
    "max_pixels",
    type=click.IntRange(1),
    help="Largest image in pixels (413 beyond).",
)
@setting_option(
    "--allow-image-host",
    "allow_image_hosts",
    multiple=True,
    help="A host whose http(s) image URLs may be fetched (repeatable).",
)
@setting_option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="A browser origin allowed to call the API (repeatable; none by default).",
)
@setting_option(
    "--log-phi",
    "log_phi",
    is_flag=True,
    help="Log prompts and generated text (patient data!): debugging only.",
)
@with_runtime_options
@click.option(
    "--cache-size",
    type=click.IntRange(0),
    default=None,
    help="Image embeddings kept in memory (0 disables the cache; default: the runtime's).",
)
@with_dicom_options
def serve(
    bundle_dir: Path,
    host: str,
    port: int,
    runtime_options: RuntimeOptions,
    cache_size: int | None,
    dicom: dict[str, Any],
    **settings: Any,
) -> None:
    """Serve BUNDLE over HTTP: /v1/chat/completions (OpenAI-compatible, streaming),
    /v1/models, /v1/reports (DICOM/PNG/JPEG upload -> findings, impression, labels), /health,
    /metrics (Prometheus) and a page at /. The model loads and warms up in the background;
    /health answers 503 until it is ready, and a model that fails to load ends the command.
    With --dicom-port, also a DICOM listener: studies in, draft reports (DICOM SR) out."""
    from cxrlite.server import create_app

    server_settings = ServerSettings(**settings, dicom=dicom_settings(dicom, host))
    cache = {} if cache_size is None else {"cache_size": cache_size}
    factory = functools.partial(runtime_options.open, bundle_dir, warmup=True, **cache)
    warn_about(host, server_settings)
    # Request lines are the server's output: shown at the CLI's default (warnings) level too.
    server_logger = logging.getLogger("cxrlite.server")
    if server_logger.getEffectiveLevel() > logging.INFO:
        server_logger.setLevel(logging.INFO)
    if server_settings.dicom is not None:  # studies received, reported, delivered (no PHI)
        pacs_logger = logging.getLogger("cxrlite.pacs")
        pacs_logger.setLevel(min(pacs_logger.getEffectiveLevel(), logging.INFO))
        d = server_settings.dicom
        click.echo(f"cxrlite serve: DICOM AE {d.ae_title} on {d.host}:{d.port}, spool {d.spool_dir}",
                   err=True)  # fmt: skip
    click.echo(f"cxrlite serve: http://{host}:{port}/ (model loading; /health says when ready)",
               err=True)  # fmt: skip
    failure = run_server(functools.partial(create_app, factory, server_settings), host, port)
    if failure is not None:
        raise click.ClickException(load_failure(bundle_dir, failure))
