"""Fixtures that several test modules share, each built once per test session.

- `tiny_tokenizer`: the tiny preset's tokenizer trained on `export_testkit.report_corpus`.
- `tiny_checkpoint(bridger)`: (model, checkpoint folder) of `export_testkit.make_checkpoint`
  for that bridger ("mlp" or "qformer"), on `tiny_tokenizer`.
- `runtime_built`: `runtime_testkit.runtime_bundle`'s (model, checkpoint folder, bundle folder).
- `runtime`: the server tests' Runtime (`server_testkit.shared_runtime`); `make_client(**settings)`
  a TestClient of a new app on it (closed after the test), `client` one with default settings.
  A module that needs another runtime or client defines its own fixture of that name.

Every test module sees the same objects: treat the models and folders as read-only (copy a
folder before changing it, deep-copy a model before changing its weights). The testkits are
imported inside the fixtures, so modules that use none of them never import torch for them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Any:
    from export_testkit import report_corpus

    from cxrlite.model.config import get_preset
    from cxrlite.model.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    return build_tokenizer(get_preset("tiny"), folder, corpus=report_corpus())


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_tokenizer) -> Callable[..., tuple[Any, Path]]:
    from export_testkit import make_checkpoint

    root = tmp_path_factory.mktemp("tiny-checkpoints")
    built: dict[str, tuple[Any, Path]] = {}

    def get(bridger: str = "mlp") -> tuple[Any, Path]:
        if bridger not in built:
            built[bridger] = make_checkpoint(root, bridger, tokenizer=tiny_tokenizer)
        return built[bridger]

    return get


@pytest.fixture(scope="session")
def runtime_built(tmp_path_factory) -> tuple[Any, Path, Path]:
    from runtime_testkit import runtime_bundle

    return runtime_bundle(tmp_path_factory)


@pytest.fixture(scope="session")
def runtime(tmp_path_factory) -> Any:
    from server_testkit import shared_runtime

    return shared_runtime(tmp_path_factory)


@pytest.fixture
def make_client(runtime) -> Any:
    from server_testkit import app_clients

    with app_clients(runtime) as make:
        yield make


@pytest.fixture
def client(make_client) -> Any:
    return make_client()
