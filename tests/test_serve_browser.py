"""The `ocrtune serve` web page in Debian's chromium, driven by Playwright (no `playwright install`):
upload a bundled formula image, see the LaTeX box fill with the model's answer and KaTeX render it,
all with nothing fetched from outside the server. Skips when chromium or playwright is missing.

Set OCRTUNE_SCREENSHOT=path.png to also save the final screenshot there (docs/serve.png is the bundled reader's,
made by scripts/screenshots.py).
"""
from __future__ import annotations

import base64
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from test_serve import SAMPLE, start_server, stop_server

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW = 48


@pytest.fixture(scope="module")
def page_server(tiny_model_dir, tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    log = tmp_path_factory.mktemp("serve_browser") / "server.log"
    proc, url = start_server(["--max_new_tokens", str(MAX_NEW)], log)
    yield url
    stop_server(proc)


@pytest.fixture
def browser_page(page_server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1100, "height": 540}, device_scale_factor=1)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=page_server)
        page = context.new_page()
        seen = {"requests": [], "failed": [], "console_errors": []}
        page.on("request", lambda r: seen["requests"].append(r.url))
        page.on("requestfailed", lambda r: seen["failed"].append(r.url))
        page.on("console", lambda m: seen["console_errors"].append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: seen["console_errors"].append(str(e)))
        yield page, seen
        context.close()
        browser.close()


def formula_image(tmp_path: Path) -> tuple[Path, str]:
    import pyarrow.parquet as pq
    row = pq.read_table(SAMPLE).to_pylist()[3]
    path = tmp_path / "formula.png"
    path.write_bytes(row["image"]["bytes"])
    return path, row["text"]


def test_page_reads_an_uploaded_formula(page_server, browser_page, tmp_path):
    from playwright.sync_api import expect
    page, seen = browser_page
    image, truth = formula_image(tmp_path)
    page.goto(page_server + "/")
    # (locator waits, not wait_for_function: the page's CSP rightly forbids eval)
    expect(page.locator("#model-name")).to_have_text("tiny", timeout=15_000)
    assert page.locator("#latex").input_value() == ""

    page.set_input_files("#file", str(image))
    page.wait_for_selector("body[data-state=done]", state="attached", timeout=120_000)
    predicted = page.locator("#latex").input_value()
    assert predicted.strip()
    assert page.locator("#error").is_hidden()
    assert re.fullmatch(r"Recognized in \d+\.\d\d s( \(stopped at the token limit\))?",
                        page.locator("#status").text_content())
    assert page.locator("#preview").is_visible()
    assert page.locator("#preview").get_attribute("src").startswith("data:image/png;base64,")

    # the page shows exactly what the API answers for this image
    url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    api = httpx.post(page_server + "/v1/chat/completions", timeout=120, json={
        "max_tokens": MAX_NEW, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
    assert api.json()["choices"][0]["message"]["content"] == predicted

    # the prediction went through KaTeX: rendered, or (random tiny weights) KaTeX's parse error
    page.wait_for_selector("#render .katex, #render .render-error", timeout=10_000)
    page.screenshot(path=str(tmp_path / "serve_prediction.png"), full_page=True)

    # the box is editable and re-renders: a real formula gives KaTeX markup with its TeX source
    page.fill("#latex", truth)
    page.wait_for_selector("#render .katex", timeout=10_000)
    assert page.locator("#render .katex-mathml annotation").text_content() == truth
    assert page.locator("#render .katex-html").is_visible()
    assert page.evaluate("document.fonts.ready.then(() => document.fonts.check('16px KaTeX_Main'))")
    loaded = page.evaluate("[...document.fonts].filter(f => f.status === 'loaded').map(f => f.family)")
    assert any(f.startswith("KaTeX") for f in loaded), loaded

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("OCRTUNE_SCREENSHOT"):
        shutil.copy(shot, os.environ["OCRTUNE_SCREENSHOT"])

    # copy button puts the LaTeX on the clipboard
    page.click("#copy")
    expect(page.locator("#copy")).to_have_text("Copied", timeout=5_000)
    assert page.evaluate("navigator.clipboard.readText()") == truth

    # a file that is not an image gets a clear message, and the page stays usable
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#error")).to_contain_text("not a supported image", timeout=5_000)

    # everything came from this server: no CDN, no failed loads, no console errors (CSP included)
    assert seen["requests"] and all(u.startswith(page_server) or u.startswith(("data:", "blob:")) for u in seen["requests"])
    assert not seen["failed"], seen["failed"]
    assert not seen["console_errors"], seen["console_errors"]


def test_editing_the_box_stops_the_stream_writing_into_it(tmp_path):
    """Once the user types in the LaTeX box, tokens still streaming never land in it, and the request is
    cancelled (the server stops generating). A fake engine streams 'a ' every 0.05 s, 200 times."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from playwright.sync_api import expect, sync_playwright

    from test_serve_hardening import FakeEngine, serving
    engine = FakeEngine()
    engine.pieces, engine.piece_s = 200, 0.05
    image = tmp_path / "f.png"
    Image.new("RGB", (60, 20), "white").save(image)
    with serving(engine, max_new_tokens=MAX_NEW) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            expect(page.locator("#model-name")).to_have_text("fake", timeout=15_000)
            page.set_input_files("#file", str(image))
            expect(page.locator("#latex")).to_have_value(re.compile(r"^(a )+a?$"), timeout=15_000)
            page.locator("#latex").press("End")
            page.locator("#latex").type("X")  # the user's edit, mid-stream
            edited = page.locator("#latex").input_value()
            assert edited.endswith("X")
            time.sleep(1.0)  # ~20 more pieces would have arrived
            assert page.locator("#latex").input_value() == edited
            expect(page.locator("#status")).to_have_text("Stopped: you edited the LaTeX.")
            assert page.locator("#error").is_hidden()
            assert engine.streamed < 100  # the server stopped generating once the page cancelled
        finally:
            browser.close()
