"""POST /v1/reports: PNG and DICOM uploads match the runtime's report, the cache, bad uploads,
and a report past its deadline cancelled between two tokens."""

from __future__ import annotations

from server_testkit import WAIT_S, gated, phantom_dicom, phantom_png

from cxrlite.data.labels import CHEXPERT_OBSERVATIONS
from cxrlite.imaging.decode import load_image


def test_reports_route_for_png_and_dicom(client, runtime):
    png = phantom_png(3)
    response = client.post(
        "/v1/reports", files={"file": ("study.png", png, "image/png")}, data={"max_tokens": "8"}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "bundle" and body["variants"] == runtime.variants
    assert list(body["labels"]) == list(CHEXPERT_OBSERVATIONS)
    assert body["usage"]["completion_tokens"] == 16  # findings + impression, 8 each
    direct = runtime.report(load_image(png), max_tokens=8)
    assert (body["findings"], body["impression"], body["labels"]) == (
        direct["findings"],
        direct["impression"],
        direct["labels"],
    )
    assert body["timings"]["queue_ms"] >= 0 and body["timings"]["request_ms"] > 0
    dicom = client.post(
        "/v1/reports", files={"file": ("x.dcm", phantom_dicom(4), "application/dicom")}
    )
    assert dicom.status_code == 200 and dicom.json()["cache_hit"] is False
    again = client.post(
        "/v1/reports", files={"file": ("x.dcm", phantom_dicom(4), "application/dicom")}
    )
    assert (
        again.json()["cache_hit"] is True and again.json()["findings"] == dicom.json()["findings"]
    )
    missing = client.post("/v1/reports", data={"max_tokens": "8"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "file"
    empty = client.post("/v1/reports", files={"file": ("x.png", b"", "image/png")})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_file"
    bad = client.post("/v1/reports", files={"file": ("x.png", b"GIF89a" + bytes(40), "image/png")})
    assert bad.status_code == 415 and bad.json()["error"]["code"] == "not_an_image"


def test_report_timeout_cancels_between_tokens(make_client, runtime):
    client = make_client(request_timeout_s=0.5)
    state = client.app.state
    with gated(runtime, free_steps=1) as gate:
        response = client.post(
            "/v1/reports", files={"file": ("study.png", phantom_png(8), "image/png")}
        )
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        job = state.scheduler.current  # held inside the findings' third token
        assert job is not None and job.cancel_requested.is_set()
        gate.gate.set()
        assert job.finished.wait(WAIT_S)
    # the findings stopped at 3 tokens and the impression never started
    assert job.result["finish_reason"] == {"findings": "cancelled", "impression": "cancelled"}
    assert job.result["usage"]["completion_tokens"] == 3
