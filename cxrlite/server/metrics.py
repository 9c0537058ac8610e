"""Prometheus metrics of one server (its own registry, so several apps in one process — tests —
never share counters). Names follow vLLM's where they mean the same thing, so existing
dashboards need only a prefix change. Labels are bounded: routes are the fixed route set,
error codes the fixed set our errors use; nothing request-specific becomes a label."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds. Latency buckets reach minutes, so a report from a large model on CPUs alone still
# lands in a bucket of its own.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PER_TOKEN = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
_VISION = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.ttft = Histogram(
            "cxrlite_time_to_first_token_seconds",
            "Request received to first generated token.",
            buckets=_LATENCY,
            registry=registry,
        )
        self.inter_token = Histogram(
            "cxrlite_inter_token_latency_seconds",
            "Time between two generated tokens of one request.",
            buckets=_PER_TOKEN,
            registry=registry,
        )
        self.e2e = Histogram(
            "cxrlite_e2e_request_latency_seconds",
            "Request received to last byte of the answer, by route.",
            ["route"],
            buckets=_LATENCY,
            registry=registry,
        )
        self.queue_time = Histogram(
            "cxrlite_queue_time_seconds",
            "Time a ready request waited for the LLM worker.",
            buckets=_LATENCY,
            registry=registry,
        )
        self.vision_time = Histogram(
            "cxrlite_vision_time_seconds",
            "Image decoding, preprocessing and vision tower (cache misses "
            "included at their cost, hits near zero).",
            buckets=_VISION,
            registry=registry,
        )
        self.in_flight = Gauge(
            "cxrlite_requests_in_flight",
            "API requests being served (queued or running).",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "cxrlite_queue_depth",
            "Requests admitted and waiting for the LLM worker.",
            registry=registry,
        )
        self.ready = Gauge(
            "cxrlite_ready", "1 once the model is loaded and warmed up.", registry=registry
        )
        self.requests = Counter(
            "cxrlite_requests",
            "HTTP requests by route and status.",
            ["route", "status"],
            registry=registry,
        )
        self.cache_hits = Counter(
            "cxrlite_image_cache_hits",
            "Requests whose image embeddings came from the cache.",
            registry=registry,
        )
        self.cache_misses = Counter(
            "cxrlite_image_cache_misses",
            "Requests whose image went through the vision tower.",
            registry=registry,
        )
        self.errors = Counter(
            "cxrlite_errors",
            "Error answers by OpenAI error type and code.",
            ["type", "code"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "cxrlite_prompt_tokens", "Prompt positions prefilled.", registry=registry
        )
        self.generated_tokens = Counter(
            "cxrlite_generation_tokens", "Tokens generated.", registry=registry
        )
        self.finished = Counter(
            "cxrlite_generations_finished",
            "Generations by finish reason (stop, length, cancelled).",
            ["finish_reason"],
            registry=registry,
        )

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self.queue_depth.set_function(depth)

    def image_lookup(self, cache_hit: bool | None, vision_s: float) -> None:
        if cache_hit is None:
            return
        (self.cache_hits if cache_hit else self.cache_misses).inc()
        self.vision_time.observe(vision_s)

    def generation_done(self, finish_reason: str, usage: dict[str, int]) -> None:
        self.finished.labels(finish_reason).inc()
        self.prompt_tokens.inc(usage.get("prompt_tokens", 0))
        self.generated_tokens.inc(usage.get("completion_tokens", 0))

    def error(self, type: str, code: str | None) -> None:
        self.errors.labels(type, code or "none").inc()

    def exposition(self) -> tuple[bytes, str]:
        """The text format body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
