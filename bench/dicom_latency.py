"""PACS in, SR out, timed: studies sent back to back over DICOM, each study's time from its
C-STORE answered to its SR received by a PACS stand-in, and the throughput.

    cxrlite bench dicom BUNDLE                       # 20 studies, `cxrlite serve --dicom-port`
    cxrlite bench dicom BUNDLE --in-process --studies 50 --out dicom.json

The PACS stand-in (`Receiver`) is a pynetdicom Storage SCP in this process; cxrlite runs as a
`cxrlite serve --dicom-port` subprocess (the deployment: scheduler, spool, outbox) or, with
`--in-process`, as a DicomService here. Each study is one frontal phantom radiograph (256 px,
DX, synthetic identifiers); `--lateral` adds a lateral to each. The figures include the quiet
period (`--quiet-seconds`), which a real deployment sets to seconds: read them with it.
Also used by the tests as their study maker and PACS stand-in.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import httpx
import numpy as np

logger = logging.getLogger(__name__)

SR_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
)


def study_instances(seed: int, *, views: tuple[str, ...] = ("PA",), syntax: str | None = None,
                    modality: str = "DX", size: int = 256, study_uid: str | None = None,
                    patient_name: str | None = None, patient_id: str | None = None,
                    **dataset: Any) -> list[bytes]:  # fmt: skip
    """One study: an instance (Part 10 bytes) per view, of phantom `seed`, in one series;
    `dataset` sets more attributes (BodyPartExamined="KNEE", ...)."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from cxrlite.imaging.write import dicom_bytes
    from cxrlite.phantoms.generator import make_phantom_study

    _, pixels = make_phantom_study(seed, 0, size=size)
    study_uid, series_uid = study_uid or generate_uid(), generate_uid()
    out = []
    for number, view in enumerate(views, 1):
        data = dicom_bytes(np.asarray(pixels).astype(np.uint8), modality=modality, view=view,
                           transfer_syntax=syntax or ExplicitVRLittleEndian)  # fmt: skip
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.InstanceNumber = study_uid, series_uid, number
        if patient_name is not None:
            ds.PatientName = patient_name
        if patient_id is not None:
            ds.PatientID = patient_id
        for keyword, value in dataset.items():
            setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return out


class Receiver:
    """A Storage SCP for SRs and PDFs that keeps what it receives: a PACS stand-in."""

    def __init__(self, ae_title: str = "PACS", port: int = 0) -> None:
        self.ae_title, self.port = ae_title, port
        self.received: list[tuple[float, Any]] = []  # (time.time() at receipt, data set)
        self._cond = threading.Condition()
        self._server: Any = None

    def start(self) -> Receiver:
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.ae_title)
        for sop_class in SR_CLASSES:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

        def store(event: Any) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._cond:
                self.received.append((time.time(), ds))
                self._cond.notify_all()
            return 0x0000

        handlers = [(evt.EVT_C_STORE, store)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False,
                                       evt_handlers=handlers)  # fmt: skip
        self.port = int(self._server.server_address[1])
        return self

    @property
    def destination(self) -> str:
        return f"dimse://{self.ae_title}@127.0.0.1:{self.port}"

    def wait_for(self, n: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.received) >= n, timeout_s)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


def store_all(port: int, instances: list[bytes], *, called: str = "CXRLITE",
              calling: str = "MODALITY") -> list[tuple[int, float]]:  # fmt: skip
    """C-STORE each instance on one association: (status, time.time() when answered) each."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(io.BytesIO(data)) for data in instances]
    ae = AE(ae_title=calling)
    for key in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}:
        ae.add_requested_context(*key)  # each file in its own transfer syntax
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    if not assoc.is_established:
        raise click.ClickException(f"cannot associate with {called}@127.0.0.1:{port}")
    try:
        results = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            results.append((int(getattr(status, "Status", -1)), time.time()))
        return results
    finally:
        assoc.release()


@contextlib.contextmanager
def cxrlite_scp(bundle: Path, receiver: Receiver, spool: Path, quiet_s: float, threads: int,
                in_process: bool, max_tokens: int,
                log: Path) -> Iterator[tuple[int, Callable[[], str]]]:  # fmt: skip
    """(DICOM port, a function returning its /metrics text) of a running cxrlite."""
    from prometheus_client import generate_latest

    from cxrlite.bench.servers import ServerSpec, free_port, running_server

    if in_process:
        from cxrlite.pacs.service import DicomService, DicomSettings
        from cxrlite.runtime import Runtime

        runtime = Runtime.from_bundle(bundle, threads=threads, warmup=True)
        settings = DicomSettings(port=0, destinations=(receiver.destination,), spool_dir=spool,
                                 quiet_s=quiet_s, max_tokens=max_tokens)  # fmt: skip
        service = DicomService(settings, runtime)
        service.start()
        try:
            yield service.port, lambda: generate_latest(service.metrics.registry).decode()
        finally:
            service.stop()
            runtime.close()
        return
    http_port, dicom_port = free_port(), free_port()
    command = [sys.executable, "-m", "cxrlite.cli", "serve", str(bundle), "--port",
               str(http_port), "--threads", str(threads), "--dicom-port", str(dicom_port),
               "--dicom-destination", receiver.destination, "--dicom-spool", str(spool),
               "--dicom-quiet-seconds", str(quiet_s),
               "--max-tokens-cap", str(max_tokens)]  # fmt: skip
    spec = ServerSpec("cxrlite", command, http_port, "/health")
    with running_server(spec, log):
        yield dicom_port, lambda: httpx.get(f"{spec.url}/metrics", timeout=10).text


def histogram_mean(text: str, name: str) -> float | None:
    """sum / count of a Prometheus histogram in exposition `text`."""
    from prometheus_client.parser import text_string_to_metric_families

    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (f"{name}_sum", f"{name}_count"):
                values[sample.name.rsplit("_", 1)[1]] = sample.value
    return values["sum"] / values["count"] if values.get("count") else None


def run(bundle: Path, studies: int, lateral: bool, quiet_s: float, threads: int,
        in_process: bool, max_tokens: int, timeout_s: float, log: Path) -> dict[str, Any]:  # fmt: skip
    import pydicom

    views = ("PA", "LL") if lateral else ("PA",)
    sent = [study_instances(i, views=views) for i in range(studies)]
    receiver = Receiver().start()
    try:
        with (
            tempfile.TemporaryDirectory(prefix="cxrlite-bench-dicom-") as tmp,
            cxrlite_scp(
                bundle, receiver, Path(tmp), quiet_s, threads, in_process, max_tokens, log
            ) as (port, metrics_text),
        ):
            t0 = time.time()
            answered: dict[str, float] = {}
            for instances in sent:
                results = store_all(port, instances)
                if any(status != 0 for status, _ in results):
                    raise click.ClickException(f"a C-STORE failed: {results}")
                uid = str(pydicom.dcmread(io.BytesIO(instances[0])).StudyInstanceUID)
                answered[uid] = results[-1][1]
            t_sent = time.time()
            if not receiver.wait_for(studies, timeout_s):
                raise click.ClickException(
                    f"{len(receiver.received)} of {studies} SRs within {timeout_s:.0f} s"
                )
            time.sleep(0.2)  # the sender counts a delivery just after the receiver has it
            server_mean = histogram_mean(
                metrics_text(), "cxrlite_dicom_receipt_to_delivered_seconds"
            )
    finally:
        receiver.stop()
    latencies = [at - answered[str(ds.StudyInstanceUID)] for at, ds in receiver.received]
    last = max(at for at, _ in receiver.received)
    return {
        "bundle": str(bundle),
        "mode": "in-process DicomService" if in_process else "cxrlite serve --dicom-port",
        "studies": studies,
        "instances_per_study": len(views),
        "quiet_seconds": quiet_s,
        "threads": threads,
        "max_tokens": max_tokens,
        "send_s": round(t_sent - t0, 3),
        "receipt_to_sr_s": {
            "p50": round(float(np.percentile(latencies, 50)), 3),
            "p99": round(float(np.percentile(latencies, 99)), 3),
            "min": round(min(latencies), 3),
            "max": round(max(latencies), 3),
        },
        "throughput_studies_per_min": round(studies / (last - t0) * 60, 2),
        # cxrlite's own figure (/metrics): a study's last instance received -> its SR delivered
        "server_mean_receipt_to_delivered_s": None
        if server_mean is None
        else round(server_mean, 3),
    }


@click.command("dicom")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--studies", type=click.IntRange(1), default=20, show_default=True)
@click.option("--lateral", is_flag=True, help="A lateral in each study too.")
@click.option(
    "--quiet-seconds",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="cxrlite's wait for the rest of a study (included in the latency).",
)
@click.option(
    "--threads",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="cxrlite's CPU threads (1: no spinning threads fighting this process).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(1),
    default=128,
    show_default=True,
    help="Longest findings / impression, in tokens.",
)
@click.option("--in-process", is_flag=True, help="A DicomService here, not `cxrlite serve`.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=1800.0,
    show_default=True,
    help="Seconds to wait for every SR.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("dicom_latency.json"),
    show_default=True,
    help="The JSON result.",
)
def dicom_command(bundle: Path, studies: int, lateral: bool, quiet_seconds: float, threads: int,
                  max_tokens: int, in_process: bool, timeout: float, out: Path) -> None:  # fmt: skip
    """DICOM in, SR out: receipt-to-SR latency (p50/p99) and throughput."""
    import json

    from cxrlite.fileio import write_json
    from cxrlite.pacs.destinations import require_pacs_extra

    require_pacs_extra("cxrlite bench dicom")
    log = out.with_suffix(".serve.log")
    result = run(bundle, studies, lateral, quiet_seconds, threads, in_process, max_tokens,
                 timeout, log)  # fmt: skip
    lat = result["receipt_to_sr_s"]
    click.echo(
        f"{studies} studies: receipt -> SR p50 {lat['p50']:.2f} s, p99 {lat['p99']:.2f} s "
        f"(quiet period {quiet_seconds:g} s included); "
        f"{result['throughput_studies_per_min']:.1f} studies/min"
    )
    click.echo(json.dumps(result, indent=2))
    write_json(out, result)
    click.echo(f"wrote {out}", err=True)
