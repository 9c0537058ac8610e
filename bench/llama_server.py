"""llama.cpp's own C++ `llama-server`, built once from the llama.cpp sources that the installed
llama-cpp-python vendors, and cached: the performance peer of `cxrlite bench batching` and
`cxrlite bench compare --llama-server`, running the same ggml kernels as cxrlite's runtime.

    cxrlite bench llama-server                 # prints the binary's path (builds on first use)
    cxrlite bench llama-server --source DIR    # an unpacked llama_cpp_python sdist (offline)

The sdist of the installed version comes from the package index (`pip download --no-binary`);
the build is CMake's Release with the default native CPU flags (as llama-cpp-python's wheel is
built here), static libraries, no libcurl. Cached under ~/.cache/cxrlite/llama-server/<version>/.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import click

from cxrlite.errors import CxrliteError

logger = logging.getLogger(__name__)

DEFAULT_CACHE = Path("~/.cache/cxrlite/llama-server")
BINARY = "llama-server"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")  # fmt: skip


class LlamaServerBuildError(CxrliteError, RuntimeError):
    """The llama-server binary could not be built; the message names the failed step."""


def installed_version() -> str:
    try:
        import llama_cpp
    except ImportError:
        raise LlamaServerBuildError("llama-cpp-python is not installed") from None
    return str(llama_cpp.__version__)


def _run(command: list[str], log: Path, step: str) -> None:
    with open(log, "ab") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise LlamaServerBuildError(f"{step} failed (exit {done.returncode}); see {log}")


def download_sources(version: str, into: Path, log: Path) -> Path:
    """The llama_cpp_python sdist of `version`, unpacked; its vendor/llama.cpp folder."""
    _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
          "--no-build-isolation", "-d", str(into), f"llama-cpp-python=={version}"],
         log, "downloading the llama-cpp-python sources")  # fmt: skip
    archives = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise LlamaServerBuildError(f"pip left no llama_cpp_python sdist in {into}; see {log}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(into, filter="data")
    return llama_cpp_folder(next(into.glob("llama_cpp_python-*")))


def llama_cpp_folder(source: Path) -> Path:
    """The llama.cpp tree inside an unpacked sdist (or the llama.cpp tree itself)."""
    for candidate in (source / "vendor" / "llama.cpp", source):
        if (candidate / "CMakeLists.txt").is_file() and (candidate / "tools").is_dir():
            return candidate
    raise LlamaServerBuildError(f"{source}: no llama.cpp source tree (vendor/llama.cpp) here")


def build_llama_server(
    source: Path | None = None, cache_dir: Path | None = None, jobs: int | None = None
) -> Path:
    """The cached binary for the installed llama-cpp-python version, built when missing."""
    version = installed_version()
    root = (cache_dir or DEFAULT_CACHE).expanduser() / version
    binary = root / BINARY
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    root.mkdir(parents=True, exist_ok=True)
    log = root / "build.log"
    with tempfile.TemporaryDirectory(prefix="llama-server-") as tmp:
        tree = llama_cpp_folder(source) if source else download_sources(version, Path(tmp), log)
        build = Path(tmp) / "build"
        _run(["cmake", "-S", str(tree), "-B", str(build), *CMAKE_FLAGS], log, "cmake configure")
        _run(["cmake", "--build", str(build), "--target", BINARY, "-j", str(jobs or os.cpu_count())],
             log, "building llama-server")  # fmt: skip
        built = build / "bin" / BINARY
        if not built.is_file():
            raise LlamaServerBuildError(f"the build made no {built}; see {log}")
        partial = binary.with_suffix(".partial")
        shutil.copy2(built, partial)
        partial.replace(binary)  # atomic: a cached binary is always a whole one
    logger.info("built %s (llama-cpp-python %s)", binary, version)
    return binary


@click.command("llama-server")
@click.option("--source", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="An unpacked llama_cpp_python sdist (or llama.cpp tree) to "
              "build instead of downloading the installed version's.")  # fmt: skip
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=f"Where builds are kept [default: {DEFAULT_CACHE}].",
)
@click.option("--jobs", type=click.IntRange(1), default=None, help="Parallel compile jobs.")
def llama_server_command(source: Path | None, cache_dir: Path | None, jobs: int | None) -> None:
    """Build (once) and print the path of llama.cpp's C++ llama-server, from the sources of the
    installed llama-cpp-python (the performance peer of `cxrlite bench batching`)."""
    try:
        click.echo(build_llama_server(source, cache_dir, jobs))
    except LlamaServerBuildError as e:
        raise click.ClickException(str(e)) from None
