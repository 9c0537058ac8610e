"""Start and stop benchmark servers (cxrlite serve, llama-cpp-python's server) as subprocesses on
free loopback ports, wait until they are ready, and sample their resident memory.

Used by `cxrlite bench compare` (cxrlite.bench.server_compare) and `cxrlite bench soak`
(cxrlite.bench.soak), with the command-line options and handling they share. A server always
stops (SIGINT, then SIGKILL after a grace period), on errors, Ctrl-C and SIGTERM too, and dies
with its parent on Linux.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from cxrlite.bundle import Kind
from cxrlite.data.prompts import FINDINGS_PROMPT
from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

STOP_GRACE_S = 20.0
# One thread each by default: the client runs on the same machine, and llama.cpp's and
# onnxruntime's thread pools collapse when oversubscribed (spinning threads fight for cores).
DEFAULT_THREADS = 1


class ServerCompareError(CxrliteError, RuntimeError):
    """A server could not be started or the bundle cannot be compared."""


# --- command line ----------------------------------------------------------------------------


class ErrorExit(click.ClickException):
    """An error, with exit code 2: exit code 1 already means "ran, and did not pass"."""

    exit_code = 2


# fmt: off
_SERVER_OPTIONS = [
    click.argument("bundle", type=click.Path(file_okay=False, path_type=Path)),
    click.option("--threads", type=click.IntRange(1), default=DEFAULT_THREADS, show_default=True,
                 help="Threads per server."),
    click.option("--llm-variant", default=None, help="A GGUF variant [default: the bundle's]."),
    click.option("--prompt", default=FINDINGS_PROMPT, help="[default: the findings prompt]"),
    click.option("--max-tokens", type=click.IntRange(1), default=64, show_default=True),
    click.option("--start-timeout", type=float, default=300.0, show_default=True,
                 help="Seconds for a server to be ready."),
    click.option("--request-timeout", type=float, default=300.0, show_default=True,
                 help="Seconds per request."),
]
# fmt: on


def server_options(out_default: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options `compare` and `soak` share: BUNDLE, --out (default `out_default`), threads,
    the LLM variant, prompt, max tokens and timeouts."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        out = click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                           default=Path(out_default), show_default=True,
                           help="Folder for JSON, tables, plots and server logs.")  # fmt: skip
        for decorate in reversed([*_SERVER_OPTIONS[:1], out, *_SERVER_OPTIONS[1:]]):
            f = decorate(f)
        return f

    return apply


@contextlib.contextmanager
def managed_run() -> Iterator[None]:
    """Around a compare or soak run: progress on the log (one line per server start and level,
    not one per request), SIGTERM unwinding like Ctrl-C so that servers stop, and errors as one
    line with exit code 2."""
    from cxrlite.cli import USER_ERRORS

    for name in ("cxrlite.bench.server_compare", "cxrlite.bench.batching", __name__):
        named = logging.getLogger(name)
        if named.getEffectiveLevel() > logging.INFO:
            named.setLevel(logging.INFO)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    except USER_ERRORS as e:  # ServerCompareError and every other error a user can cause
        raise ErrorExit(str(e) or type(e).__name__) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- command lines ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    name: str  # "cxrlite" or "llama_cpp"
    command: list[str]
    port: int
    ready_path: str  # GET answering 200 once the model is loaded
    env: dict[str, str] | None = None  # added to this process's environment

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def free_port() -> int:
    """A loopback port free now (another process could take it before the server binds: the
    server then exits and the start fails with its log named)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BundleLLM:
    variant: str
    gguf: Path
    n_ctx: int


def bundle_llm(bundle_dir: str | Path, llm_variant: str | None = None) -> BundleLLM:
    """The GGUF cxrlite serves (the manifest's default LLM, or `llm_variant`) and its n_ctx."""
    from cxrlite.bundle import BundleError, load_bundle
    from cxrlite.runtime.engine import MAX_DEFAULT_CTX

    try:
        bundle = load_bundle(bundle_dir, verify=False)
    except BundleError as e:
        raise ServerCompareError(str(e)) from None
    variant = llm_variant or bundle.default.get("llm")
    ggufs = sorted(n for n, v in bundle.llm_variants.items() if v.kind == Kind.GGUF)
    if variant not in ggufs:
        raise ServerCompareError(
            f"{bundle_dir}: LLM variant {variant!r} is not a GGUF, so llama_cpp.server cannot "
            f"serve it; pass --llm-variant with one of {ggufs}"
        )
    # As Runtime.from_bundle sizes the context: both servers get the same n_ctx.
    n_ctx = min(bundle.config.llm.max_position_embeddings, MAX_DEFAULT_CTX)
    return BundleLLM(variant, bundle.variant_file("llm", variant), n_ctx)


def cxrlite_spec(
    bundle_dir: str | Path,
    port: int,
    threads: int,
    llm_variant: str | None = None,
    *,
    parallel: int | None = None,
    source: str | Path | None = None,
    name: str = "cxrlite",
    batch_invariant: bool = True,
) -> ServerSpec:
    """`cxrlite serve`, with `parallel` slots; `source` runs another checkout of cxrlite (its
    folder first on PYTHONPATH), e.g. the commit before a change, for a before/after table. Only
    its `cxrlite/` package is taken from there: an editable install maps bench/, export/,
    quantize/ and train/ to the installed tree, and the server imports none of them."""
    command = [sys.executable, "-m", "cxrlite.cli", "serve", str(bundle_dir), "--port", str(port),
               "--threads", str(threads)]  # fmt: skip
    if llm_variant:
        command += ["--llm-variant", llm_variant]
    if parallel is not None:
        command += ["--parallel", str(parallel)]
    if not batch_invariant:
        command += ["--no-batch-invariant"]
    env = {"PYTHONPATH": str(Path(source).resolve())} if source is not None else None
    return ServerSpec(name, command, port, "/health", env)


def llama_cpp_spec(gguf: str | Path, port: int, threads: int, n_ctx: int) -> ServerSpec:
    # Settings matched to cxrlite's runtime: f16 KV cache (both defaults), flash attention on
    # (cxrlite asks llama.cpp for "auto", which is on for the CPU; llama_cpp.server's default is
    # off), the same n_ctx and threads. interrupt_requests defaults to true there: a waiting
    # request would cut the streaming one short, so concurrent requests would end early.
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
               "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx),
               "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--flash_attn", "true", "--interrupt_requests", "false"]  # fmt: skip
    return ServerSpec("llama_cpp", command, port, "/v1/models")


def llama_server_spec(
    binary: str | Path,
    gguf: str | Path,
    port: int,
    threads: int,
    n_ctx: int,
    *,
    mmproj: str | Path | None = None,
    parallel: int = 1,
    no_repack: bool = False,
) -> ServerSpec:
    """llama.cpp's own C++ server (the path Ollama takes), with the vision tower as an mmproj
    and `parallel` slots decoded together. -c is the total over slots, so each slot gets n_ctx;
    f16 KV cache and flash attention as cxrlite's runtime; no prompt-cache reuse is turned off
    (llama-server keeps each slot's prefix, as cxrlite keeps its prompt states)."""
    command = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
               "--ctx-size", str(n_ctx * parallel), "--parallel", str(parallel),
               "--threads", str(threads), "--threads-batch", str(threads),
               "--flash-attn", "on", "--no-webui"]  # fmt: skip
    if mmproj is not None:
        command += ["--mmproj", str(mmproj)]
    if no_repack:  # the plain weight layout, as cxrlite's runtime loads it
        command += ["--no-repack"]
    return ServerSpec("llama_cpp", command, port, "/health")


# --- process management ----------------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None] | None:
    """For the child (Linux): SIGTERM it when this process dies, even by SIGKILL, so that a
    killed benchmark leaves no server holding the cores. Resolved here, before the fork: the
    child must not import anything (another thread may hold the import lock)."""
    if sys.platform != "linux":
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    death_signal = int(signal.SIGTERM)
    return lambda: prctl(1, death_signal)  # 1: PR_SET_PDEATHSIG


@contextlib.contextmanager
def running_server(
    spec: ServerSpec, log_path: str | Path, start_timeout: float = 300.0
) -> Iterator[subprocess.Popen]:
    """Start `spec`, wait until its ready path answers 200, yield the process; always stop it.
    Its stdout and stderr are appended to `log_path`."""
    import httpx

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n=== {datetime.now(UTC).isoformat()} {' '.join(spec.command)}\n".encode())
        log.flush()
        # Its own session: a Ctrl-C in the terminal reaches only us, and we stop it in order.
        process = subprocess.Popen(
            spec.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_parent_death_signal(),
            env={**os.environ, **spec.env} if spec.env else None,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if process.poll() is not None:
                raise ServerCompareError(
                    f"{spec.name} exited with code {process.returncode} before it was ready; "
                    f"see {log_path}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(spec.url + spec.ready_path, timeout=2.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerCompareError(
                    f"{spec.name} not ready after {start_timeout:.0f} s; see {log_path}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(0.2)  # doubles as the pause between polls
        logger.info("%s ready on port %d (pid %d)", spec.name, spec.port, process.pid)
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> int:
    """SIGINT, as Ctrl-C (uvicorn shuts down cleanly; `cxrlite serve` then exits 0), SIGKILL
    after `grace` s; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d ignored SIGINT for %.0f s; killing it", process.pid, grace)
            process.kill()
            process.wait()
    return int(process.returncode)


class RssSampler:
    """Resident memory of a process and its children, sampled every `interval` s in a thread."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        import psutil

        self._process, self._interval = psutil.Process(pid), interval
        self._start = time.monotonic()
        self.samples: list[tuple[float, int]] = []  # (seconds since start, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def sample(self) -> int | None:
        """One sample now (None once the process is gone)."""
        import psutil

        try:
            processes = [self._process, *self._process.children(recursive=True)]
            rss = 0
            for p in processes:
                with contextlib.suppress(psutil.NoSuchProcess):  # a child that just ended
                    rss += p.memory_info().rss
        except psutil.NoSuchProcess:
            return None
        self.samples.append((round(time.monotonic() - self._start, 3), rss))
        return rss

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def start(self) -> None:
        """The first sample now (the reference: start of load), then one every interval."""
        self._start = time.monotonic()
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling and take a last sample (safe to call when never started)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
            self.sample()
