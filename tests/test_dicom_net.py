"""DICOM networking on loopback, in pure Python: pynetdicom SCUs -> cxrlite's SCP (spool,
reporter, outbox) -> a pynetdicom Storage SCP standing in for the PACS (bench.dicom_latency's
Receiver). The tiny bundle's runtime writes the reports; quiet periods and retry delays are
fractions of a second."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import time

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

pytest.importorskip("pynetdicom", reason="the pacs extra (pynetdicom) is not installed")

from pynetdicom import AE  # noqa: E402

from cxrlite.bench.dicom_latency import Receiver, store_all, study_instances  # noqa: E402
from cxrlite.cli import main  # noqa: E402
from cxrlite.pacs.metrics import DicomMetrics  # noqa: E402
from cxrlite.pacs.scp import IMAGE_STORAGE, TRANSFER_SYNTAXES  # noqa: E402
from cxrlite.pacs.service import DicomService, DicomSettings  # noqa: E402
from cxrlite.pacs.spool import uid_key  # noqa: E402

WAIT_S = 60  # bounds a failure only: waits end as soon as their condition holds
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
NAME, PID = "PLANTED^SECRETNAME", "PID-8675309"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition, timeout_s: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def sample(metrics: DicomMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


@pytest.fixture
def services(tmp_path, runtime):
    """make(**settings): a started DicomService (port 0, short quiet period and retries) on
    tmp_path/spool unless `spool` is given; `with_runtime=False`: no runtime, so nothing is
    reported (the studies stay in the spool). All stopped after."""
    made: list[DicomService] = []

    def make(*, with_runtime: bool = True, spool=None, **options) -> DicomService:
        options = {"quiet_s": 0.2, "retry_base_s": 0.1, "retry_cap_s": 0.4, "max_tokens": 8,
                   **options}  # fmt: skip
        settings = DicomSettings(port=0, spool_dir=spool or tmp_path / "spool", **options)
        service = DicomService(settings, runtime if with_runtime else None)
        service.start()
        made.append(service)
        return service

    yield make
    for service in made:
        service.stop()


@pytest.fixture
def pacs():
    receiver = Receiver().start()
    yield receiver
    receiver.stop()


def associate(port: int, *, called: str = "CXRLITE", calling: str = "MODALITY", contexts=None):
    ae = AE(ae_title=calling)
    for sop_class, syntaxes in contexts or [("1.2.840.10008.1.1", [ExplicitVRLittleEndian])]:
        ae.add_requested_context(sop_class, syntaxes)
    return ae.associate("127.0.0.1", port, ae_title=called)


def spooled(service: DicomService) -> list:
    return [path for study in service.spool.studies() for path in study.files]


def test_c_echo_and_the_cli_echo(services):
    service = services(with_runtime=False)
    assoc = associate(service.port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    result = CliRunner().invoke(
        main, ["dicom", "echo", f"dimse://CXRLITE@127.0.0.1:{service.port}"]
    )
    assert result.exit_code == 0, result.output
    assert "success (0x0000)" in result.output and "round trip" in result.output


def test_every_image_class_and_transfer_syntax_is_accepted(services):
    service = services(with_runtime=False)
    contexts = [(sop, [syntax]) for sop in IMAGE_STORAGE for syntax in TRANSFER_SYNTAXES]
    assert len(contexts) == 48 and len(TRANSFER_SYNTAXES) == 12
    assoc = associate(service.port, contexts=contexts)
    assert assoc.is_established
    assert len(assoc.accepted_contexts) == 48 and not assoc.rejected_contexts
    assoc.release()


SENT_SYNTAXES = [
    ("DX", ExplicitVRLittleEndian), ("CR", ImplicitVRLittleEndian), ("DX", JPEGBaseline8Bit),
    ("CR", JPEGLSLossless), ("DX", JPEGLSNearLossless), ("DX", JPEG2000Lossless),
    ("CR", JPEG2000), ("DX", RLELossless), ("CR", DeflatedExplicitVRLittleEndian),
]  # fmt: skip


def instance_in(modality: str, syntax: str, seed: int) -> bytes:
    """One CR/DX instance in `syntax` (deflated: pydicom deflates on writing)."""
    deflate = syntax == DeflatedExplicitVRLittleEndian
    (data,) = study_instances(seed, modality=modality, syntax=None if deflate else syntax)
    if not deflate:
        return data
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_c_store_uncompressed_and_compressed_is_spooled(services):
    service = services(with_runtime=False)
    sent = [instance_in(modality, syntax, i) for i, (modality, syntax) in enumerate(SENT_SYNTAXES)]
    assert [status for status, _ in store_all(service.port, sent)] == [0] * len(sent)
    for data, (modality, syntax) in zip(sent, SENT_SYNTAXES, strict=True):
        ds = pydicom.dcmread(io.BytesIO(data))
        path = (
            service.spool.incoming
            / uid_key(ds.StudyInstanceUID)
            / f"{uid_key(ds.SOPInstanceUID)}.dcm"
        )
        got = pydicom.dcmread(path)  # on disk before the answer, as it was sent
        assert (got.SOPInstanceUID, got.Modality) == (ds.SOPInstanceUID, modality)
        assert got.file_meta.TransferSyntaxUID == syntax
        assert got.pixel_array.shape == (256, 256)
    assert sample(service.metrics, "cxrlite_dicom_instances_received_total") == len(sent)


def test_a_wrong_called_ae_title_is_rejected(services):
    service = services(with_runtime=False)
    assoc = associate(service.port, called="NOTCXRLITE")
    assert assoc.is_rejected and not assoc.is_established
    assert "Called AE title not recognised" in assoc.acceptor.primitive.reason_str
    result = CliRunner().invoke(main, ["dicom", "echo", f"dimse://OTHER@127.0.0.1:{service.port}"])
    assert result.exit_code == 1  # (the output also has this process's SCP log lines)
    assert result.output.splitlines()[-1] == (
        f"Error: dimse://OTHER@127.0.0.1:{service.port}: association rejected (Rejected "
        "Permanent, Service User: Called AE title not recognised)"
    )


def test_the_allow_list_rejects_other_callers_and_hosts(services, tmp_path):
    service = services(with_runtime=False, allow=("MODALITY@localhost", "*@10.9.8.7"))
    assert associate(service.port, calling="MODALITY").is_established
    stranger = associate(service.port, calling="STRANGER")
    assert stranger.is_rejected
    assert "Calling AE title not recognised" in stranger.acceptor.primitive.reason_str
    elsewhere = services(with_runtime=False, allow=("MODALITY@10.9.8.7",), spool=tmp_path / "other")
    assert associate(elsewhere.port, calling="MODALITY").is_rejected  # right AE, wrong host


def test_a_malformed_data_set_fails_and_the_server_stays_up(services, tmp_path, monkeypatch):
    from pynetdicom import _config

    service = services(with_runtime=False)
    (good,) = study_instances(4)
    ds = pydicom.dcmread(io.BytesIO(good))
    garbled = tmp_path / "garbled.dcm"  # valid file meta, then a cut-off element
    body = b"\x08\x00\x18\x00UI\x40\x00" + b"1.2.3"
    part10 = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(part10, ds.file_meta, enforce_standard=True)
    garbled.write_bytes(b"\0" * 128 + b"DICM" + part10.getvalue() + body)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # bytes as they are
    assoc = associate(service.port, contexts=[(ds.SOPClassUID, [ExplicitVRLittleEndian])])
    assert assoc.send_c_store(garbled).Status == 0xC000
    cut = tmp_path / "cut.dcm"  # pixel data cut short
    cut.write_bytes(good[:-30000])
    assert assoc.send_c_store(cut).Status == 0xC000
    no_uid = pydicom.dcmread(io.BytesIO(good))
    del no_uid.StudyInstanceUID
    assert assoc.send_c_store(no_uid).Status == 0xC000
    assert assoc.send_c_store(ds).Status == 0x0000  # same association, still served

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(service.spool, "store", disk_full)
    assert assoc.send_c_store(ds).Status == 0xA700  # not written: not acknowledged
    monkeypatch.undo()
    assoc.release()
    assert associate(service.port).send_c_echo().Status == 0x0000  # and new ones too
    assert sample(service.metrics, "cxrlite_dicom_store_failures_total", kind="unreadable") == 3
    assert sample(service.metrics, "cxrlite_dicom_store_failures_total", kind="write") == 1
    assert len(spooled(service)) == 1


def sr_of(pacs: Receiver, index: int = 0) -> pydicom.Dataset:
    return pacs.received[index][1]


def texts(sr: pydicom.Dataset) -> list[str]:
    found = []
    for item in sr.ContentSequence:
        found += [str(item.TextValue)] if "TextValue" in item else []
        found += texts(item) if "ContentSequence" in item else []
    return found


def test_a_study_is_reported_to_the_destination(services, pacs, caplog):
    caplog.set_level(logging.DEBUG)
    service = services(destinations=(pacs.destination,))
    study = study_instances(5, views=("PA", "LL"), patient_name=NAME, patient_id=PID)
    knee = study_instances(6, study_uid=pydicom.dcmread(io.BytesIO(study[0])).StudyInstanceUID,
                           patient_name=NAME, patient_id=PID, BodyPartExamined="KNEE")  # fmt: skip
    assert [s for s, _ in store_all(service.port, study + knee)] == [0, 0, 0]
    assert pacs.wait_for(1, WAIT_S)
    sr = sr_of(pacs)
    source = pydicom.dcmread(io.BytesIO(study[0]))
    assert sr.SOPClassUID == COMPREHENSIVE_SR
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.PatientID == PID  # patient attributes come from the source
    ref = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert any("lateral present" in text for text in texts(sr))
    assert wait_until(lambda: service.outbox.depth() == 0) and not service.spool.studies()
    m = service.metrics
    assert sample(m, "cxrlite_dicom_instances_received_total") == 3
    assert sample(m, "cxrlite_dicom_refused_total", reason="body_part") == 1
    assert sample(m, "cxrlite_dicom_studies_reported_total") == 1
    assert wait_until(lambda: sample(m, "cxrlite_dicom_sent_total", object="sr") == 1)
    assert sample(m, "cxrlite_dicom_receipt_to_delivered_seconds_count") == 1
    assert "lateral present" in caplog.text and "body part not chest" in caplog.text
    assert uid_key(source.StudyInstanceUID) in caplog.text  # studies are named by hash
    for secret in (NAME, PID, "SECRETNAME", str(source.StudyInstanceUID),
                   str(source.SOPInstanceUID), str(sr.SOPInstanceUID)):  # fmt: skip
        assert secret not in caplog.text
    assert pacs.wait_for(1, 0) and len(pacs.received) == 1  # one SR, no PDF unless asked


def test_destination_down_the_sr_waits_then_is_delivered(services, tmp_path):
    port = free_port()
    service = services(destinations=(f"dimse://PACS@127.0.0.1:{port}",))
    store_all(service.port, study_instances(7))
    m = service.metrics
    assert wait_until(lambda: sample(m, "cxrlite_dicom_send_failures_total", object="sr") >= 2)
    [item] = service.outbox.items()
    assert item.meta["attempts"] >= 2 and "connection refused" in item.meta["last_error"]
    assert sample(m, "cxrlite_dicom_outbox_depth") == 1
    pacs = Receiver(port=port).start()
    try:
        assert pacs.wait_for(1, WAIT_S)
        assert wait_until(lambda: service.outbox.depth() == 0)
        assert sample(m, "cxrlite_dicom_sent_total", object="sr") == 1
    finally:
        pacs.stop()


def test_a_restart_delivers_what_was_pending(services, tmp_path):
    port = free_port()
    first = services(destinations=(f"dimse://PACS@127.0.0.1:{port}",))
    store_all(first.port, study_instances(8))
    assert wait_until(lambda: first.outbox.depth() == 1 and not first.spool.studies())
    first.stop()
    sidecar = json.loads(next((tmp_path / "spool" / "outbox").glob("*.json")).read_text())
    assert sidecar["destination"] == f"dimse://PACS@127.0.0.1:{port}"
    pacs = Receiver(port=port).start()
    try:
        second = services(destinations=(f"dimse://PACS@127.0.0.1:{port}",))
        assert pacs.wait_for(1, WAIT_S)
        assert wait_until(lambda: second.outbox.depth() == 0)
    finally:
        pacs.stop()


def test_a_study_spooled_before_a_crash_is_reported_after_restart(services, pacs):
    crashed = services(destinations=(pacs.destination,), quiet_s=3600)  # never reports
    study = study_instances(9)
    assert store_all(crashed.port, study)[0][0] == 0x0000  # C-STORE answered success ...
    crashed.stop()  # ... then the process "dies" before reporting
    assert len(spooled(crashed)) == 1 and not pacs.received
    services(destinations=(pacs.destination,))  # the next start picks it up
    assert pacs.wait_for(1, WAIT_S)
    assert sr_of(pacs).StudyInstanceUID == pydicom.dcmread(io.BytesIO(study[0])).StudyInstanceUID


def test_without_a_destination_reports_are_kept_on_disk(services):
    service = services()
    store_all(service.port, study_instances(14))
    assert wait_until(lambda: list(service.kept.glob("*.sr.dcm")))
    [kept] = service.kept.glob("*.sr.dcm")
    assert pydicom.dcmread(kept).SOPClassUID == COMPREHENSIVE_SR
    assert service.outbox.depth() == 0


def test_the_pdf_goes_too_when_asked(services, pacs):
    service = services(destinations=(pacs.destination,), pdf=True)
    store_all(service.port, study_instances(10))
    assert pacs.wait_for(2, WAIT_S)
    classes = sorted(str(ds.SOPClassUID) for _, ds in pacs.received)
    assert classes == sorted([COMPREHENSIVE_SR, "1.2.840.10008.5.1.4.1.1.104.1"])
    assert wait_until(
        lambda: sample(service.metrics, "cxrlite_dicom_sent_total", object="pdf") == 1
    )


def test_serve_runs_the_scp_beside_the_http_api(runtime, pacs, tmp_path):
    from fastapi.testclient import TestClient
    from server_testkit import metric

    from cxrlite.server import ServerSettings, create_app

    dicom = DicomSettings(port=0, destinations=(pacs.destination,), spool_dir=tmp_path / "s",
                          quiet_s=0.2, retry_base_s=0.1, retry_cap_s=0.4)  # fmt: skip

    settings = ServerSettings(max_tokens_cap=8, dicom=dicom)
    with TestClient(create_app(runtime, settings)) as client:
        port = client.app.state.dicom.port
        store_all(port, study_instances(11))
        assert pacs.wait_for(1, WAIT_S)
        assert metric(client, "cxrlite_dicom_instances_received_total") == 1
        assert metric(client, "cxrlite_dicom_studies_reported_total") == 1
        assert metric(client, "cxrlite_queue_time_seconds_count") >= 1  # it used the LLM queue
        assert client.get("/health").status_code == 200
    with pytest.raises(Exception):  # noqa: B017 - the listener is gone with the app
        store_all(port, study_instances(12))


def test_cli_send_stores_files_and_errors_are_one_line(services, pacs, tmp_path):
    files = []
    for i, data in enumerate(study_instances(13, views=("PA", "LL"))):
        files.append(tmp_path / f"{i}.dcm")
        files[-1].write_bytes(data)
    service = services(with_runtime=False)
    here = f"dimse://CXRLITE@127.0.0.1:{service.port}"
    ok = CliRunner().invoke(main, ["dicom", "send", str(tmp_path), here])
    assert ok.exit_code == 0, ok.output
    assert "stored 2 file(s)" in ok.output and len(spooled(service)) == 2
    down = f"dimse://CXRLITE@127.0.0.1:{free_port()}"
    refused = CliRunner().invoke(main, ["dicom", "send", str(files[0]), down])
    assert refused.exit_code == 1
    assert refused.output == f"Error: {down}: cannot connect (connection refused)\n"
    bad = CliRunner().invoke(main, ["dicom", "send", str(files[0]), "dimse://x"])
    assert bad.exit_code == 1 and bad.output.startswith("Error: destination 'dimse://x'")


def test_without_the_pacs_extra_one_line_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynetdicom", None)  # import pynetdicom -> ImportError
    for args in (["dicom", "echo", "dimse://A@127.0.0.1:1"],
                 ["serve", str(tmp_path), "--dicom-port", "0"]):  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, result.output
        assert result.output.count("\n") == 1
        assert 'pip install "cxrlite[pacs]"' in result.output


def test_serve_dicom_option_errors_are_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = CliRunner().invoke(main, ["serve", str(tmp_path), "--dicom-port", str(port)])
    assert taken.exit_code == 1
    assert taken.output == (
        f"Error: cannot listen for DICOM on 127.0.0.1:{port}: Address already in use\n"
    )
    lonely = CliRunner().invoke(main, ["serve", str(tmp_path), "--dicom-destination", "x"])
    assert lonely.exit_code == 2 and "--dicom-destination needs --dicom-port" in lonely.output
    bad = ["serve", str(tmp_path), "--dicom-port", "0", "--dicom-allow", "A@no-such-host.invalid"]
    result = CliRunner().invoke(main, bad)
    assert result.exit_code == 1
    assert "unknown host 'no-such-host.invalid'" in result.output
