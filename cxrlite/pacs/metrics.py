"""The DICOM service's Prometheus metrics, registered on the server's registry (`/metrics`) or on
a registry of their own. Labels are bounded: refusal codes (cxrlite.pacs.chest.REFUSALS and
the few of the service), store failure kinds, object kinds (sr, pdf)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds from receipt to delivery: the quiet period, the report and the send, retries included.
_DELIVERY = (0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)


class DicomMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry = registry or CollectorRegistry()
        self.received = Counter(
            "cxrlite_dicom_instances_received",
            "Instances received by C-STORE and spooled (answered success).",
            registry=registry,
        )
        self.store_failures = Counter(
            "cxrlite_dicom_store_failures",
            "C-STOREs answered with a failure status, by kind (unreadable, write).",
            ["kind"],
            registry=registry,
        )
        self.reported = Counter(
            "cxrlite_dicom_studies_reported",
            "Studies whose draft report was queued in the outbox.",
            registry=registry,
        )
        self.refused = Counter(
            "cxrlite_dicom_refused",
            "Instances refused by the chest check (and studies with nothing to report), by reason.",
            ["reason"],
            registry=registry,
        )
        self.report_failures = Counter(
            "cxrlite_dicom_report_failures",
            "Studies whose report failed unexpectedly (kept in the spool's failed/ folder).",
            registry=registry,
        )
        self.sent = Counter(
            "cxrlite_dicom_sent",
            "Objects delivered to a destination, by object (sr, pdf).",
            ["object"],
            registry=registry,
        )
        self.send_failures = Counter(
            "cxrlite_dicom_send_failures",
            "Delivery attempts that failed (the object stays in the outbox), by object.",
            ["object"],
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "cxrlite_dicom_outbox_depth",
            "Objects waiting in the outbox.",
            registry=registry,
        )
        self.delivery_time = Histogram(
            "cxrlite_dicom_receipt_to_delivered_seconds",
            "Receipt of a study's last instance to its SR delivered (quiet period included).",
            buckets=_DELIVERY,
            registry=registry,
        )

    def watch_outbox(self, depth: Callable[[], float]) -> None:
        self.outbox_depth.set_function(depth)
