"""The server's runtime: given ready, or made by a factory in a background thread at startup, so
the server listens (and /health answers 503 "loading") while the model loads and warms up."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from cxrlite.imaging.decode import load_image
from cxrlite.server.errors import APIError
from cxrlite.server.metrics import ServerMetrics
from cxrlite.server.settings import ServerSettings

logger = logging.getLogger(__name__)


def warm_decoders() -> None:
    """Decode a tiny PNG and DICOM once: the first decode of each format imports its plugins,
    which would otherwise land on the first user's request."""
    import numpy as np

    from cxrlite.imaging.write import dicom_bytes, png_bytes

    gradient = np.tile(np.arange(16, dtype=np.uint8) * 16, (16, 1))
    for data in (png_bytes(gradient), dicom_bytes(gradient)):
        load_image(data, name="warm-up")


class RuntimeLoader:
    """Holds the runtime once it is ready. A runtime made here is owned (closed by `close`); a
    runtime given is the caller's. `on_error(exception)`, when given, hears of a failed load
    (`cxrlite serve` exits on it); without it the failure is logged, and /health reports it."""

    def __init__(
        self,
        source: Any,
        settings: ServerSettings,
        metrics: ServerMetrics,
        on_error: Callable[[BaseException], None] | None = None,
        on_ready: Callable[[Any], None] | None = None,
    ) -> None:
        self.factory: Callable[[], Any] | None = source if callable(source) else None
        self.runtime: Any = None if self.factory else source
        self.error: str | None = None
        self.loaded_at = int(time.time())
        self.thread: threading.Thread | None = None
        self.settings, self.metrics, self.on_error = settings, metrics, on_error
        self.on_ready = on_ready  # hears of the runtime once it is ready (sizes the workers)
        self._closing = False

    def start(self) -> None:
        if self.factory is None:
            self._ready(self.runtime)
            return
        self.thread = threading.Thread(target=self._load, name="cxrlite-load", daemon=True)
        self.thread.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            runtime = self.factory()  # type: ignore[misc]
        except Exception as e:  # noqa: BLE001 - reported by /health and to on_error
            self._failed(e)
            return
        if self._closing:
            runtime.close()
            return
        warm_decoders()
        self.runtime, self.loaded_at = runtime, int(time.time())
        self._ready(runtime)
        logger.info("model %s ready in %.1f s", runtime.model_id, time.perf_counter() - started)
        for name, choice in getattr(runtime, "parallelism", {}).items():
            logger.info("%s: %s (%s)", name, choice["value"], choice["reason"])

    def _ready(self, runtime: Any) -> None:
        if self.on_ready is not None:
            self.on_ready(runtime)
        self.metrics.ready.set(1)

    def _failed(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}"
        if self.on_error is None:
            logger.error("loading the model failed: %s", self.error)
        else:
            self.on_error(error)

    def close(self) -> None:
        """Close the runtime if this loader made it; one still loading is closed when ready."""
        self._closing = True
        if self.factory is not None and self.runtime is not None:
            self.runtime.close()

    def ready(self) -> Any:
        """The runtime, or the 503 that says why there is none yet."""
        if self.runtime is not None:
            return self.runtime
        if self.error is not None:
            raise APIError(503, "the model failed to load; see /health", code="model_load_failed")
        raise APIError(
            503,
            "the model is loading; retry shortly",
            code="model_loading",
            headers=self.settings.retry_after,
        )
