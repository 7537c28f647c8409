"""docs/webui-{train,runs,checkpoint}.png: `ocrtune web-ui` fine-tuning the bundled reader on the sample's handwriting
(its first-run settings, as `ocrtune sft` with no flags), then evaluating, merging and reading examples/handwritten.png
with the result, in Debian's chromium driven by Playwright (as tests/test_webui.py drives it). About 5 minutes on 2
CPU cores.

    python scripts/webui_screenshots.py                 # writes docs/webui-*.png
    python scripts/webui_screenshots.py --out_dir shots
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


def start(tmp: Path):
    log = tmp / "webui.log"
    proc = subprocess.Popen([sys.executable, "-m", "ocrtune", "web-ui", "--port", "0", "--output_dir", str(tmp / "out")],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=tmp)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"error: ocrtune web-ui did not start: {log.read_text()[-500:]}")


def fill(page, flag: str, value: str) -> None:
    page.fill(f"#flag-{flag}", value)
    page.dispatch_event(f"#flag-{flag}", "change")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", default=str(ROOT / "docs"))
    a = p.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("error: chromium is not installed; apt-get install -y chromium")
    from playwright.sync_api import sync_playwright
    out = Path(a.out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start(Path(tmp))
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(url + "/")
                page.wait_for_selector("body[data-ready='1']", state="attached", timeout=30_000)
                fill(page, "logging_steps", "2")
                page.wait_for_selector("#command:has-text('--logging_steps 2')", timeout=10_000)
                page.screenshot(path=str(out / "webui-train.png"), full_page=True)
                page.click("#launch")
                page.wait_for_selector("body[data-run-status=running]", state="attached", timeout=120_000)
                page.wait_for_selector("body[data-run-status=finished]", state="attached", timeout=900_000)
                page.screenshot(path=str(out / "webui-runs.png"), full_page=True)
                page.click("#tab-checkpoint")
                page.fill("#eval-dataset", "latex-ocr-sample-handwrite#4")
                page.fill("#eval-tokens", "96")
                page.click("#eval")
                page.wait_for_selector("body[data-eval=done]", state="attached", timeout=300_000)
                page.click("#merge")
                page.wait_for_selector("body[data-merge=done]", state="attached", timeout=300_000)
                merged = [o for o in page.locator("#ck-name option").all_text_contents() if o.endswith("-merged")]
                page.select_option("#ck-name", merged[0])
                page.set_input_files("#ocr-file", str(ROOT / "examples" / "handwritten.png"))
                page.wait_for_selector("body[data-ocr=done]", state="attached", timeout=300_000)
                page.wait_for_selector("#ocr-render .katex, #ocr-render .render-error", timeout=10_000)
                page.screenshot(path=str(out / "webui-checkpoint.png"), full_page=True)
                print(f"read: {page.locator('#ocr-latex').input_value()!r}; wrote {out}/webui-*.png")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    main()
