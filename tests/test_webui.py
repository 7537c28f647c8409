"""`ocrtune web-ui`: the API's refusals in-process (token, Host, paths outside its folders, the CLI's one-line
errors, uploads), and the whole page in Debian's chromium on the tiny model: start a run, watch the loss curve
grow, stop it, resume it to the end, evaluate, merge, OCR an image. Skips the browser part when chromium or
playwright is missing. OCRTUNE_WEBUI_SHOTS=<folder> also saves a screenshot of each tab there (docs/webui-*.png)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ocrtune.cli.main import check_sft
from ocrtune.serve.hosts import FrontDoor, HostPolicy
from ocrtune.webui.app import create_app
from ocrtune.webui.args import WebUiArgs

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
STEPS = 60  # long enough that Stop lands mid-run on a fast machine (the tiny model steps ~8 times a second)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def client(tmp_path, token=None, **kw) -> TestClient:
    args = WebUiArgs(output_dir=str(tmp_path / "out"), **kw)
    app = FrontDoor(create_app(args, check_sft, token), HostPolicy("127.0.0.1"))
    return TestClient(app, base_url="http://127.0.0.1")


def test_token_is_required_when_set(tmp_path):
    c = client(tmp_path, token="s3cret")
    for r in (c.get("/api/runs"), c.get("/api/runs", headers={"Authorization": "Bearer wrong"}),
              c.post("/api/command", json={"flags": {}})):
        assert r.status_code == 401
        assert r.json()["error"].startswith("missing or wrong token")
    assert c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).json() == {"runs": []}
    assert c.get("/api/runs?token=s3cret").status_code == 200  # EventSource can't send headers
    assert c.get("/").status_code == 200  # the page itself loads, and asks for the token


def test_other_host_names_are_refused(tmp_path):
    r = client(tmp_path).get("/api/runs", headers={"Host": "evil.example:7860"})
    assert r.status_code == 400 and "is not served here" in r.json()["error"]["message"]


def test_command_and_the_cli_errors_beside_their_field(tmp_path):
    c = client(tmp_path)
    out = str((tmp_path / "out").resolve())
    r = c.post("/api/command", json={"flags": {"model": "tiny", "max_steps": "4", "dataset": "latex-ocr-sample#20",
                                               "freeze_vit": "true"}})
    assert r.json() == {"command": f"ocrtune sft --model tiny --max_steps 4 --dataset 'latex-ocr-sample#20' "
                                   f"--output_dir {out}"}  # freeze_vit true is the default: not passed
    r = c.post("/api/command", json={"flags": {"lora_dropout": "2"}})
    assert r.status_code == 400
    assert r.json() == {"error": "--lora_dropout must be below 1, got 2.0; use a number from 0 to below 1",
                        "field": "lora_dropout"}
    r = c.post("/api/command", json={"flags": {"max_steps": "abc"}})
    assert r.status_code == 400
    assert r.json() == {"error": "ocrtune sft: argument --max_steps: invalid int value: 'abc'; run 'ocrtune sft --help' "
                                 "to see the flags", "field": "max_steps"}


@pytest.mark.parametrize("flag,value", [("model", "/etc"), ("dataset", "../../secret.parquet"),
                                        ("val_dataset", "/etc/passwd#3")])
def test_paths_outside_the_folders_are_refused(tmp_path, flag, value):
    r = client(tmp_path).post("/api/launch", json={"flags": {flag: value}})
    assert r.status_code == 403
    assert r.json()["field"] == flag
    assert r.json()["error"].startswith(f"--{flag} {value.split('#')[0]} is outside the folders this page may use")
    assert not (tmp_path / "out" / ".webui" / "jobs").exists()  # nothing launched


def test_runs_outside_the_output_folder_are_refused(tmp_path):
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "args.json").write_text("{}")
    c = client(tmp_path)
    for path, body in (("/api/delete", {"run": "../victim", "confirm": True}), ("/api/resume", {"run": "../victim"}),
                       ("/api/eval", {"run": "/etc", "checkpoint": "x"})):
        r = c.post(path, json=body)
        assert r.status_code == 400 and r.json()["error"].startswith("no run ")
    assert c.get("/api/events?run=../victim").status_code == 400
    assert (tmp_path / "victim" / "args.json").read_text() == "{}"


def test_uploads_are_bounded(tmp_path):
    c = client(tmp_path, max_upload_mb=0.001, max_uploads=2)
    r = c.post("/api/upload?name=../../evil.sh", content=b"x")
    assert r.status_code == 400 and "is not a dataset file or image" in r.json()["error"]
    assert c.post("/api/upload?name=big.jsonl", content=b"x" * 2000).status_code == 413
    r = c.post("/api/upload?name=../a.jsonl", content=b"{}\n")
    assert r.status_code == 200 and Path(r.json()["path"]) == (tmp_path / "out" / "webui_uploads" / "a.jsonl").resolve()
    assert c.post("/api/upload?name=b.jsonl", content=b"{}\n").status_code == 200
    r = c.post("/api/upload?name=c.jsonl", content=b"{}\n")
    assert r.status_code == 413 and "--max_uploads" in r.json()["error"]
    assert sorted(p.name for p in (tmp_path / "out" / "webui_uploads").iterdir()) == ["a.jsonl", "b.jsonl"]


def test_delete_needs_confirmation(tmp_path):
    run = tmp_path / "out" / "tiny" / "v0-x"
    run.mkdir(parents=True)
    (run / "args.json").write_text("{}")
    c = client(tmp_path)
    assert [r["id"] for r in c.get("/api/runs").json()["runs"]] == ["tiny/v0-x"]
    r = c.post("/api/delete", json={"run": "tiny/v0-x"})
    assert r.status_code == 400 and "confirmation" in r.json()["error"]
    assert run.exists()
    assert c.post("/api/delete", json={"run": "tiny/v0-x", "confirm": True}).json() == {"ok": True}
    assert not run.exists()


# ---- the page, in chromium ------------------------------------------------------------------------

@pytest.fixture
def webui(tmp_path, tiny_model_dir):
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    log = tmp_path / "webui.log"
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "ocrtune", "web-ui", "--port", "0", "--output_dir",
                             str(tmp_path / "out")], stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 60
    while not (m := re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text())):
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.2)
    yield m.group(1), tmp_path
    proc.terminate()
    proc.wait(15)


def test_page_trains_stops_resumes_evaluates_merges_and_reads(webui):
    from playwright.sync_api import expect, sync_playwright
    url, tmp_path = webui
    shots = os.environ.get("OCRTUNE_WEBUI_SHOTS")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        errors = []
        # the refusals the test provokes (400s) show as failed loads; script errors must not
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and
                not m.text.startswith("Failed to load resource: the server responded with a status of 400") else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", state="attached", timeout=30_000)

        # with no model the fields show the bundled reader's first-run settings, which a launch leaves to the run;
        # naming another model shows the plain defaults
        assert page.locator("#flag-num_train_epochs").input_value() == "8"
        assert page.locator("#flag-lora_rank").input_value() == "32"
        expect(page.locator("#command")).not_to_contain_text("--num_train_epochs")
        page.fill("#flag-model", "tiny")
        page.dispatch_event("#flag-model", "change")
        expect(page.locator("#flag-num_train_epochs")).to_have_value("1")
        assert page.locator("#flag-lora_rank").input_value() == "8"

        # a bad value gets the CLI's one line beside its field
        page.fill("#flag-max_steps", "abc")
        page.dispatch_event("#flag-max_steps", "change")
        expect(page.locator(".field-error[data-for=max_steps]")).to_contain_text("invalid int value: 'abc'")
        for flag, value in (("model", "tiny"), ("dataset", "latex-ocr-sample#40"), ("val_dataset", "latex-ocr-sample#2"),
                            ("max_steps", str(STEPS)), ("logging_steps", "1"), ("eval_steps", "20"), ("batch_size", "2")):
            page.fill(f"#flag-{flag}", value)
            page.dispatch_event(f"#flag-{flag}", "change")
        expect(page.locator("#command")).to_contain_text("ocrtune sft --model tiny")
        expect(page.locator(".field-error[data-for=max_steps]")).to_be_hidden()
        if shots:
            page.screenshot(path=f"{shots}/webui-train.png", full_page=True)
        page.click("#launch")

        # the run appears, its loss curve grows live; stop it (it saves), resume it to the end
        page.wait_for_selector("body[data-run-status=running]", state="attached", timeout=60_000)
        expect(page.locator("#chart-loss")).to_have_attribute("data-points", re.compile(r"^([3-9]|\d\d+),"),
                                                              timeout=60_000)
        page.click("#stop")
        page.wait_for_selector("body[data-run-status=stopped]", state="attached", timeout=60_000)
        stopped_at = int(re.search(rf"step (\d+)/{STEPS}", page.locator("#run-progress").text_content()).group(1))
        assert 3 <= stopped_at < STEPS
        page.click("#resume")
        page.wait_for_selector("body[data-run-status=running]", state="attached", timeout=30_000)
        page.wait_for_selector("body[data-run-status=finished]", state="attached", timeout=120_000)
        expect(page.locator("#run-progress")).to_contain_text(f"step {STEPS}/{STEPS}")
        assert page.locator("#chart-loss").get_attribute("data-points").startswith(f"{STEPS},")
        if shots:
            page.screenshot(path=f"{shots}/webui-runs.png", full_page=True)

        # checkpoint actions: evaluate, merge, try it
        page.click("#tab-checkpoint")
        expect(page.locator("#ck-name")).to_have_value(f"checkpoint-{STEPS}")
        page.fill("#eval-dataset", "latex-ocr-sample#3")
        page.fill("#eval-tokens", "16")
        page.click("#eval")
        page.wait_for_selector("body[data-eval=done]", state="attached", timeout=120_000)
        assert page.locator("#eval-rows tbody tr").count() == 3
        assert page.locator("#eval-summary tr[data-metric=bleu4]").count() == 1
        page.click("#merge")
        page.wait_for_selector("body[data-merge=done]", state="attached", timeout=120_000)
        run_dirs = list((tmp_path / "out" / "tiny").glob("v*"))
        assert len(run_dirs) == 1 and (run_dirs[0] / f"checkpoint-{STEPS}-merged" / "config.json").exists()
        image = tmp_path / "formula.png"
        import pyarrow.parquet as pq
        from ocrtune.data.registry import DATASETS
        row = pq.read_table(Path(DATASETS["latex-ocr-sample"].local_dir) / "validation.parquet").slice(0, 1).to_pylist()[0]
        image.write_bytes(row["image"]["bytes"])
        page.select_option("#ck-name", f"checkpoint-{STEPS}-merged")
        page.set_input_files("#ocr-file", str(image))
        page.wait_for_selector("body[data-ocr=done]", state="attached", timeout=120_000)
        assert page.locator("#ocr-latex").input_value().strip()
        page.fill("#ocr-latex", row["text"])
        page.dispatch_event("#ocr-latex", "input")
        page.wait_for_selector("#ocr-render .katex", timeout=10_000)
        if shots:
            page.screenshot(path=f"{shots}/webui-checkpoint.png", full_page=True)
        assert not errors, errors
        browser.close()


def test_the_default_models_first_run_settings_reach_the_form_and_an_explicit_plain_default_is_kept():
    """The form shows what a run of the default model takes (its first-run settings); a value the user set back to
    the plain default (1 epoch) is a choice against them, so it is passed, where other plain defaults are not."""
    from ocrtune.models.registry import DEFAULT_MODEL, MODELS
    from ocrtune.webui.app import flag_schema, flags_to_argv
    schema = flag_schema()
    first = {d["name"]: d["first_run"] for d in schema if d["first_run"] is not None}
    assert first == {k: v for k, v in MODELS[DEFAULT_MODEL].sft_defaults.items() if k in first}
    assert first["num_train_epochs"] == 8 and first["lora_rank"] == 32
    argv = flags_to_argv({"num_train_epochs": "1", "eval_steps": "50", "lora_rank": "16"}, schema)
    assert argv == ["--num_train_epochs", "1", "--lora_rank", "16"]  # eval_steps 50 is sft's default and no model's
