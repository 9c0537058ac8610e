"""A real PACS: Orthanc (with its DICOMweb plugin) and DCMTK's storescu against cxrlite.

A session fixture runs `Orthanc CONFIG.json` in the foreground on free ports, storage in a
temporary folder, HTTP on loopback only, and cxrlite declared as a modality (AE CXRLITE at
127.0.0.1:<port>; Orthanc accepts C-STOREs only from declared modalities here), as the README's
"Connect to PACS" tells hospital IT to do. The tests:
- storescu sends a study (one JPEG 2000 image) to `cxrlite serve --dicom-port` (a subprocess on
  the tiny bundle), which is killed (-9) right after the C-STORE succeeded and started again:
  the SR arrives in Orthanc, in the same study, over C-STORE;
- Orthanc itself sends a study to cxrlite (REST /modalities/cxrlite/store), the SR comes back;
- the SR goes to Orthanc over STOW-RS (dicomweb+http://127.0.0.1:PORT/dicom-web);
- `cxrlite dicom echo` and `cxrlite dicom send` against Orthanc.
They skip, saying why, only where Orthanc, its DICOMweb plugin or storescu is missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import JPEG2000Lossless

pytest.importorskip("pynetdicom", reason="the pacs extra (pynetdicom) is not installed")

from cxrlite.bench.dicom_latency import study_instances  # noqa: E402
from cxrlite.cli import main  # noqa: E402
from cxrlite.pacs.service import DicomService, DicomSettings  # noqa: E402

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def dcmtk_storescu() -> str | None:
    """DCMTK's storescu (pynetdicom installs a Python app of the same name: not that one)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder) / "storescu"
        if path.is_file() and os.access(path, os.X_OK):
            version = subprocess.run([str(path), "--version"], capture_output=True, text=True)
            if "dcmtk" in (version.stdout + version.stderr).lower():
                return str(path)
    return None


STORESCU = dcmtk_storescu()
MISSING = [
    what
    for what, there in (
        ("Orthanc (Debian package orthanc)", shutil.which("Orthanc")),
        ("Orthanc's DICOMweb plugin (orthanc-dicomweb)", DICOMWEB_PLUGIN.exists()),
        ("DCMTK's storescu (dcmtk)", STORESCU),
    )
    if not there
]
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"not installed: {', '.join(MISSING)}")
WAIT_S = 60
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    def __init__(self, root: Path, cxrlite_port: int) -> None:
        self.http_port, self.dicom_port, self.cxrlite_port = free_port(), free_port(), cxrlite_port
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "cxrlite-test", "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"), "HttpPort": self.http_port,
            "DicomPort": self.dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "DicomModalities": {"cxrlite": ["CXRLITE", "127.0.0.1", cxrlite_port]},
            "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
        }, indent=1))  # fmt: skip
        self.log = open(root / "orthanc.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(["Orthanc", str(self.config)], stdout=self.log,
                                        stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{self.url}/system", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, f"Orthanc exited; see {root / 'orthanc.log'}"
            assert time.monotonic() < deadline, "Orthanc's REST API did not answer in 30 s"
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(1)  # its data is a temporary folder: no need for a slow stop
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    @property
    def dimse(self) -> str:
        return f"dimse://ORTHANC@127.0.0.1:{self.dicom_port}"

    def srs_of(self, study_uid: str) -> list[dict]:
        """Simplified tags of the SR instances Orthanc holds in that study."""
        found = httpx.post(f"{self.url}/tools/find", json={
            "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}).json()  # fmt: skip
        tags = [httpx.get(f"{self.url}/instances/{i}/simplified-tags").json() for i in found]
        return [t for t in tags if t.get("Modality") == "SR"]

    def wait_for_sr(self, study_uid: str, timeout_s: float = WAIT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while not (srs := self.srs_of(study_uid)):
            assert time.monotonic() < deadline, f"no SR in Orthanc after {timeout_s:.0f} s"
            time.sleep(0.1)
        return srs[0]


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), free_port())
    yield server
    server.stop()


def write_study(folder: Path, seed: int, **options) -> tuple[list[Path], str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, data in enumerate(study_instances(seed, **options)):
        files.append(folder / f"{seed}-{i}.dcm")
        files[-1].write_bytes(data)
    return files, str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def check_sr(sr: dict, study_uid: str, source_series: str) -> None:
    assert sr["SOPClassUID"] == COMPREHENSIVE_SR
    assert sr["StudyInstanceUID"] == study_uid and sr["SeriesInstanceUID"] != source_series
    assert sr["PreliminaryFlag"] == "PRELIMINARY" and sr["VerificationFlag"] == "UNVERIFIED"


def wait_for_port(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while True:
        assert process.poll() is None, f"cxrlite serve exited: {log.read_text()[-2000:]}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "cxrlite's DICOM port never opened"
            time.sleep(0.1)


def test_storescu_to_cxrlite_serve_killed_and_restarted_sr_in_orthanc(
    orthanc, runtime_built, tmp_path
):
    _, _, bundle = runtime_built
    files, study_uid = write_study(tmp_path / "study", 21, syntax=JPEG2000Lossless)
    spool, log = tmp_path / "spool", tmp_path / "serve.log"
    command = [sys.executable, "-m", "cxrlite.cli", "serve", str(bundle), "--port",
               str(free_port()), "--threads", "1", "--max-tokens-cap", "8",
               "--dicom-port", str(orthanc.cxrlite_port), "--dicom-destination", orthanc.dimse,
               "--dicom-spool", str(spool)]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as out:
        first = subprocess.Popen([*command, "--dicom-quiet-seconds", "3600"], stdout=out,
                                 stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        wait_for_port(orthanc.cxrlite_port, first, log)
        sent = subprocess.run([STORESCU, "-xv", "-aet", "MODALITY", "-aec", "CXRLITE",
                               "127.0.0.1", str(orthanc.cxrlite_port), *map(str, files)],
                              capture_output=True, text=True, timeout=WAIT_S)  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert list((spool / "incoming").glob("*/*.dcm"))  # spooled before success
    finally:
        first.send_signal(signal.SIGKILL)  # killed before it could report
        first.wait()
    assert not orthanc.srs_of(study_uid)
    with open(log, "ab") as out:
        second = subprocess.Popen([*command, "--dicom-quiet-seconds", "0.2"], stdout=out,
                                  stderr=subprocess.STDOUT, env=env)  # fmt: skip
    try:
        sr = orthanc.wait_for_sr(study_uid)
    finally:
        second.send_signal(signal.SIGINT)
        assert second.wait(30) == 0, log.read_text()[-2000:]
    series = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    check_sr(sr, study_uid, series)
    assert not list((spool / "incoming").glob("*/*.dcm"))
    assert not list((spool / "outbox").glob("*.json"))
    print(
        f"\nOrthanc now holds, in study {study_uid[:20]}..., an SR: SOP class "
        f"{sr['SOPClassUID']} (Modality {sr['Modality']}, series {sr['SeriesNumber']} "
        f"{sr['SeriesDescription']!r}, {sr['PreliminaryFlag']} / {sr['VerificationFlag']} / "
        f"{sr['CompletionFlag']}), delivered by a restarted `cxrlite serve` after kill -9"
    )


@pytest.fixture
def cxrlite_scp(orthanc, runtime, tmp_path):
    """make(destination): an in-process DicomService on the port Orthanc knows cxrlite at."""
    made = []

    def make(destination: str) -> DicomService:
        settings = DicomSettings(port=orthanc.cxrlite_port, destinations=(destination,),
                                 allow=("ORTHANC@127.0.0.1", "MODALITY"),
                                 spool_dir=tmp_path / "spool", quiet_s=0.2, max_tokens=8)  # fmt: skip
        made.append(DicomService(settings, runtime))
        made[-1].start()
        return made[-1]

    yield make
    for service in made:
        service.stop()


def test_orthanc_sends_a_study_and_the_sr_comes_back(orthanc, cxrlite_scp, tmp_path):
    cxrlite_scp(orthanc.dimse)
    files, study_uid = write_study(tmp_path / "study", 22, views=("PA", "LL"))
    ids = [httpx.post(f"{orthanc.url}/instances", content=f.read_bytes()).json()["ParentStudy"]
           for f in files]  # fmt: skip
    answer = httpx.post(f"{orthanc.url}/modalities/cxrlite/store",
                        json={"Resources": [ids[0]], "Synchronous": True}, timeout=WAIT_S)  # fmt: skip
    assert answer.status_code == 200, answer.text
    sr = orthanc.wait_for_sr(study_uid)
    check_sr(sr, study_uid, str(pydicom.dcmread(files[0]).SeriesInstanceUID))
    study = httpx.get(f"{orthanc.url}/studies/{ids[0]}").json()
    assert len(study["Series"]) == 2  # the radiographs' series and the SR's


def test_the_sr_goes_to_orthanc_over_stow_rs(orthanc, cxrlite_scp, tmp_path):
    service = cxrlite_scp(f"dicomweb+http://127.0.0.1:{orthanc.http_port}/dicom-web")
    files, study_uid = write_study(tmp_path / "study", 23)
    sent = subprocess.run([STORESCU, "-aet", "MODALITY", "-aec", "CXRLITE", "127.0.0.1",
                           str(service.port), str(files[0])], capture_output=True, text=True,
                          timeout=WAIT_S)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    check_sr(orthanc.wait_for_sr(study_uid), study_uid,
             str(pydicom.dcmread(files[0]).SeriesInstanceUID))  # fmt: skip


def test_cli_echo_and_send_against_orthanc(orthanc, tmp_path):
    dicomweb = f"dicomweb+http://127.0.0.1:{orthanc.http_port}/dicom-web"
    runner = CliRunner()
    for dest in (orthanc.dimse, dicomweb):
        echo = runner.invoke(main, ["dicom", "echo", dest])
        assert echo.exit_code == 0 and "round trip" in echo.output, echo.output
    files, study_uid = write_study(tmp_path / "study", 24, views=("PA", "LL"))
    sent = runner.invoke(main, ["dicom", "send", *map(str, files), dicomweb])
    assert sent.exit_code == 0 and "stored 2 file(s)" in sent.output, sent.output
    found = httpx.post(f"{orthanc.url}/tools/find", json={
        "Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}).json()  # fmt: skip
    assert len(found) == 2
    ds = pydicom.dcmread(io.BytesIO(files[0].read_bytes()))
    # Orthanc takes C-STOREs only from declared modalities: an unknown AE title is refused.
    stranger = runner.invoke(main, ["dicom", "send", str(files[0]), orthanc.dimse,
                                    "--ae-title", "STRANGER"])  # fmt: skip
    assert stranger.exit_code == 1 and ds.SOPInstanceUID not in stranger.output
    assert stranger.output.splitlines()[-1].startswith(f"Error: {orthanc.dimse}:")
