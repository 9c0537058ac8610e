"""`cxrlite serve`: a bundle behind an OpenAI-compatible HTTP API (see cxrlite.server)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import click

from cxrlite.commands import runtime_options

logger = logging.getLogger(__name__)


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
@click.option(
    "--api-key",
    envvar="CXRLITE_API_KEY",
    show_envvar=True,
    help="Require 'Authorization: Bearer KEY' (prefer the environment variable: "
    "command lines are visible to other users).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(1),
    default=16,
    show_default=True,
    help="Requests waiting for the model before new ones get 503.",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Seconds per request, queue included, before 504.",
)
@click.option(
    "--max-tokens-cap",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Most tokens one request may generate (and the default max_tokens).",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=64.0,
    show_default=True,
    help="Largest request body (413 beyond).",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1),
    default=None,
    help="Largest image in pixels (413 beyond); default 50 million.",
)
@click.option(
    "--allow-image-host",
    "allow_image_hosts",
    multiple=True,
    help="A host whose http(s) image URLs may be fetched (repeatable).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="A browser origin allowed to call the API (repeatable; none by default).",
)
@click.option(
    "--log-phi",
    is_flag=True,
    help="Log prompts and generated text (patient data!): debugging only.",
)
@runtime_options
@click.option(
    "--cache-size",
    type=click.IntRange(0),
    default=256,
    show_default=True,
    help="Image embeddings kept in memory (0 disables the cache).",
)
@click.pass_context
def serve(ctx: click.Context, bundle_dir: Path, host: str, port: int, api_key: str | None,
          max_queue: int, request_timeout: float, max_tokens_cap: int, max_body_mb: float,
          max_pixels: int | None, allow_image_hosts: tuple[str, ...],
          cors_origins: tuple[str, ...], log_phi: bool, vision_backend: str,
          vision_variant: str | None, llm_backend: str, llm_variant: str | None,
          n_gpu_layers: int | None, threads: int | None, cache_size: int,
          checkpoint: Path | None) -> None:  # fmt: skip
    """Serve BUNDLE over HTTP: /v1/chat/completions (OpenAI-compatible, streaming),
    /v1/models, /v1/reports (DICOM/PNG/JPEG upload -> findings, impression, labels), /health,
    /metrics (Prometheus) and a page at /. The model loads and warms up in the background;
    /health answers 503 until it is ready."""
    import uvicorn

    from cxrlite.runtime import Runtime
    from cxrlite.server import ServerSettings, create_app
    from cxrlite.server.security import exposure_warning

    settings = ServerSettings(
        api_key=api_key or None,
        max_queue=max_queue,
        request_timeout_s=request_timeout,
        max_tokens_cap=max_tokens_cap,
        max_body_mb=max_body_mb,
        allow_image_hosts=allow_image_hosts,
        cors_origins=cors_origins,
        log_phi=log_phi,
        **({"max_pixels": max_pixels} if max_pixels else {}),
    )
    factory = functools.partial(
        Runtime.from_bundle,
        bundle_dir,
        vision_backend=vision_backend,
        vision_variant=vision_variant,
        llm_backend=llm_backend,
        llm_variant=llm_variant,
        n_gpu_layers=n_gpu_layers,
        threads=threads,
        checkpoint=checkpoint,
        cache_size=cache_size,
        warmup=True,
    )
    warning = exposure_warning(host, settings.api_key)
    if warning:
        logger.warning(warning)
        click.echo(f"warning: {warning}", err=True)
    if log_phi:
        click.echo("warning: --log-phi writes prompts and reports to the log", err=True)
    # Request lines are the server's output: shown at the CLI's default (warnings) level too.
    server_logger = logging.getLogger("cxrlite.server")
    if server_logger.getEffectiveLevel() > logging.INFO:
        server_logger.setLevel(logging.INFO)
    click.echo(f"cxrlite serve: http://{host}:{port}/ (model loading; /health says when ready)",
               err=True)  # fmt: skip
    uvicorn.run(
        create_app(factory, settings),
        host=host,
        port=port,
        log_config=None,  # keep the CLI's logging format
        access_log=False,  # our own request lines carry the id, timings and token counts
        timeout_graceful_shutdown=10,
    )
