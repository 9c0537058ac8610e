"""What keeps cxrlite.server safe next to patient data: the API key, CORS, the exposure warning,
unexpected errors as a 500 with an id and no traceback, and no patient data in logs or errors
(unless log_phi)."""

from __future__ import annotations

import logging

from server_testkit import (
    PROMPT,
    chat_body,
    metric,
    phantom_dicom,
    phantom_png,
)

from cxrlite.server.security import exposure_warning


def test_api_key_guards_everything_but_health_and_page(make_client):
    client = make_client(api_key="s3cret")
    body = chat_body("bundle", None, "Hello", max_tokens=2)
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "s3cret"},
        {"Authorization": "Basic s3cret"},
    ):
        response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.get("/v1/models").status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.post("/v1/reports").status_code == 401  # refused before the body is read
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/chat/completions", json=body, headers=ok).status_code == 200
    assert client.get("/metrics", headers=ok).status_code == 200
    assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
    denied = metric(client, "cxrlite_errors_total", headers=ok, code="invalid_api_key")
    assert denied == 7  # four chat attempts, models, metrics, reports


def test_cors_is_off_unless_an_origin_is_allowed(make_client):
    preflight = {
        "Origin": "https://viewer.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    closed = make_client(api_key="k")
    assert (
        "access-control-allow-origin"
        not in closed.options("/v1/chat/completions", headers=preflight).headers
    )
    opened = make_client(api_key="k", cors_origins=("https://viewer.example",))
    answer = opened.options("/v1/chat/completions", headers=preflight)
    assert answer.status_code == 200  # preflights carry no key; the real request must
    assert answer.headers["access-control-allow-origin"] == "https://viewer.example"
    models = opened.get(
        "/v1/models", headers={"Origin": "https://viewer.example", "Authorization": "Bearer k"}
    )
    assert models.headers["access-control-allow-origin"] == "https://viewer.example"
    other = opened.options(
        "/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("0.0.0.0", "key") is None


class FailingVision:
    """A vision backend that breaks with a message quoting patient data."""

    def __init__(self, inner, patient: str):
        self.name, self.device, self.patient = inner.name, inner.device, patient

    def encode(self, pixels):
        raise RuntimeError(f"backend exploded near {self.patient}")


def test_unexpected_errors_are_500_with_an_id_and_no_traceback(client, runtime, caplog):
    inner = runtime.vision
    runtime.vision = FailingVision(inner, "DOE^" + "JOHN")
    try:
        with caplog.at_level(logging.DEBUG):
            response = client.post(
                "/v1/chat/completions", json=chat_body("bundle", phantom_png(41), PROMPT)
            )
    finally:
        runtime.vision = inner
    assert response.status_code == 500
    error = response.json()["error"]
    assert (
        error["code"] == "internal_error" and response.headers["x-request-id"] in error["message"]
    )
    assert "Traceback" not in response.text and "DOE" not in response.text
    assert "RuntimeError: <message withheld>" in caplog.text and "encode" in caplog.text
    assert "DOE^JOHN" not in caplog.text


# --- patient data ----------------------------------------------------------------------------


SENTINEL = "SENTINEL-PROMPT-7c1f9"


def test_no_patient_data_in_logs_or_errors(make_client, caplog):
    client = make_client()
    dicom = phantom_dicom(6, patient_name="DOE^JOHN")
    texts = []
    with caplog.at_level(logging.DEBUG):
        ok = client.post(
            "/v1/chat/completions",
            json=chat_body("bundle", dicom, f"{SENTINEL} describe", mime="application/dicom"),
        )
        assert ok.status_code == 200
        report = client.post(
            "/v1/reports", files={"file": ("DOE^JOHN.dcm", dicom, "application/dicom")}
        )
        assert report.status_code == 200
        refused = [
            client.post("/v1/chat/completions", json=chat_body("nope", dicom, SENTINEL)),
            client.post(
                "/v1/chat/completions",
                json=chat_body(
                    "bundle", dicom[: len(dicom) - 300], SENTINEL, mime="application/dicom"
                ),
            ),
            client.post(
                "/v1/chat/completions",
                json={"model": "bundle", "messages": [{"role": SENTINEL, "content": SENTINEL}]},
            ),
            client.post(
                "/v1/chat/completions",
                json={
                    "model": "bundle",
                    "messages": [
                        {"role": "user", "content": [{"type": SENTINEL, "text": SENTINEL}]}
                    ],
                },
            ),
            client.post(
                "/v1/chat/completions", json=chat_body("bundle", None, f"{SENTINEL} <image> twice")
            ),
            client.post(
                "/v1/reports", files={"file": ("DOE^JOHN.dcm", dicom[:400], "application/dicom")}
            ),
            client.post(
                "/v1/chat/completions", json=chat_body("bundle", None, SENTINEL + " word" * 400)
            ),
        ]
        texts = [r.text for r in refused]
    assert [r.status_code for r in refused] == [404, 400, 400, 400, 400, 400, 400]
    assert "request " in caplog.text  # the access lines were captured
    for text in [caplog.text, *texts]:
        assert "DOE" not in text and "JOHN" not in text and SENTINEL not in text


def test_log_phi_logs_prompts(make_client, caplog):
    client = make_client(log_phi=True)
    with caplog.at_level(logging.INFO, logger="cxrlite.server"):
        response = client.post(
            "/v1/chat/completions", json=chat_body("bundle", None, SENTINEL, max_tokens=2)
        )
    assert response.status_code == 200 and SENTINEL in caplog.text  # the guard above can fail
