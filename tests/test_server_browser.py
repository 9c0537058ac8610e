"""The page at / in headless Chromium: pick a radiograph, watch the report stream in (token by
token: the LLM is held after the first one), then the labels from /v1/reports.

Needs Debian's chromium (`apt-get install -y chromium`; skipped without it) and playwright-python
(in the dev extra), which drives the system browser: `playwright install` is never needed."""

from __future__ import annotations

import os
import re
import shutil

import pytest
from playwright.sync_api import expect, sync_playwright
from server_testkit import gated, live_server, phantom_png, shared_runtime

from cxrlite.imaging.decode import load_image
from cxrlite.server import ServerSettings, create_app

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "Describe the findings in this chest X-ray."  # the page's default question
CAP = 12

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason="chromium is not installed (apt-get install -y chromium chromium-driver)",
)


def test_page_streams_the_report_and_shows_labels(tmp_path_factory, tmp_path):
    runtime = shared_runtime(tmp_path_factory)
    image = phantom_png(21)
    events = list(runtime.generate(PROMPT, load_image(image), max_tokens=CAP, use_cache=False))
    want = "".join(e.text for e in events)
    # Hold the LLM after the first tokens that show text (the first may be a bare space).
    shown = next(i for i in range(len(events)) if "".join(e.text for e in events[: i + 1]))
    partial = "".join(e.text for e in events[: shown + 1])
    assert shown < CAP - 2 and partial != want
    path = tmp_path / "study.png"
    path.write_bytes(image)
    app = create_app(runtime, ServerSettings(api_key="page-key", max_tokens_cap=CAP))
    with (
        gated(runtime, free_steps=shown) as gate,
        live_server(app) as url,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/")
            # Locator assertions wait without evaluating strings, which the page's CSP forbids.
            expect(page.locator("#model")).to_contain_text("API key")
            page.fill("#key", "page-key")
            page.dispatch_event("#key", "change")  # the page reconnects with the key
            expect(page.locator("#model")).to_have_text(re.compile(r"^bundle \(onnx-fp32"))
            page.set_input_files("#file", str(path))
            # The first words are on the page while the LLM is held before the next token.
            expect(page.locator("#report")).to_have_text(partial)
            assert gate.stepping.is_set() and page.text_content("#status") == "Generating..."
            gate.gate.set()
            expect(page.locator("#status")).to_have_text("Done.", timeout=30_000)
            assert page.text_content("#error") == ""
            assert page.text_content("#report") == want
            assert "tokens/s" in page.text_content("#timings")
            assert page.text_content("#labels").startswith("Labels")
        finally:
            browser.close()
