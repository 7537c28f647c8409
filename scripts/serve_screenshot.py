"""docs/serve.png: the `ocrtune serve` web page reading examples/formula.png with the bundled reader, in Debian's
chromium driven by Playwright (as tests/test_serve_browser.py drives it).

    python scripts/serve_screenshot.py                  # writes docs/serve.png
    python scripts/serve_screenshot.py --out shot.png --image my_formula.png
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def start(log: Path):
    """`ocrtune serve` with no model (the bundled reader) on a free port: (process, url) once it listens."""
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "ocrtune", "serve", "--port", "0", "--log_level", "warning"],
                            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.time() + 180
    while time.time() < deadline:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"error: ocrtune serve did not start: {log.read_text()[-500:]}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image", default=str(ROOT / "examples" / "formula.png"))
    p.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    a = p.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("error: chromium is not installed; apt-get install -y chromium")
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(Path(tmp) / "serve.log")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
                page = browser.new_context(viewport={"width": 1100, "height": 540}, device_scale_factor=1).new_page()
                page.goto(url + "/")
                page.set_input_files("#file", a.image)
                page.wait_for_selector("body[data-state=done]", state="attached", timeout=120_000)
                page.wait_for_selector("#render .katex, #render .render-error", timeout=10_000)
                page.evaluate("document.fonts.ready")
                page.screenshot(path=a.out, full_page=True)
                print(f"read: {page.locator('#latex').input_value()!r}; wrote {a.out}")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    main()
