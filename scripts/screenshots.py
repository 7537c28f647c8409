"""The docs' screenshots, made with the bundled reader in Debian's chromium driven by Playwright (as
tests/test_serve_browser.py and tests/test_webui.py drive the pages):

- docs/serve.png: the `ocrtune serve` page reading examples/formula.png;
- docs/webui-{train,runs,checkpoint}.png: `ocrtune web-ui` fine-tuning the reader on the sample's handwriting (its
  first-run settings, as `ocrtune sft` with no flags), then evaluating, merging and reading examples/handwritten.png
  with the result (about 5 minutes on 2 CPU cores).

    python scripts/screenshots.py serve                 # writes docs/serve.png
    python scripts/screenshots.py webui --out_dir shots  # writes shots/webui-*.png
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


def start(command: list[str], log: Path, cwd: Path):
    """`ocrtune <command> --port 0` in the background: (process, url) once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "ocrtune", *command, "--port", "0"], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=cwd)
    deadline = time.time() + 180
    while time.time() < deadline:
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"error: ocrtune {command[0]} did not start: {log.read_text()[-500:]}")


def serve_page(page, out: Path, image: str) -> None:
    page.set_viewport_size({"width": 1100, "height": 540})
    page.set_input_files("#file", image)
    page.wait_for_selector("body[data-state=done]", state="attached", timeout=120_000)
    page.wait_for_selector("#render .katex, #render .render-error", timeout=10_000)
    page.evaluate("document.fonts.ready")
    page.screenshot(path=str(out / "serve.png"), full_page=True)
    print(f"read: {page.locator('#latex').input_value()!r}; wrote {out / 'serve.png'}")


def webui_page(page, out: Path) -> None:
    page.wait_for_selector("body[data-ready='1']", state="attached", timeout=30_000)
    page.fill("#flag-logging_steps", "2")
    page.dispatch_event("#flag-logging_steps", "change")
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("page", choices=("serve", "webui"))
    p.add_argument("--out_dir", default=str(ROOT / "docs"))
    p.add_argument("--image", default=str(ROOT / "examples" / "formula.png"), help="serve: the image read")
    a = p.parse_args(argv)
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("error: chromium is not installed; apt-get install -y chromium")
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        command = (["serve", "--log_level", "warning"] if a.page == "serve"
                   else ["web-ui", "--output_dir", str(tmp / "out")])
        proc, url = start(command, tmp / f"{a.page}.log", ROOT if a.page == "serve" else tmp)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, args=ARGS, headless=True)
                page = browser.new_page(viewport={"width": 1100, "height": 800})
                page.goto(url + "/")
                if a.page == "serve":
                    serve_page(page, Path(a.out_dir), a.image)
                else:
                    webui_page(page, Path(a.out_dir))
                browser.close()
        finally:
            proc.terminate()
            proc.wait(15)


if __name__ == "__main__":
    main()
