"""CPU runs of the two GPU recipes, on what the package ships (the bundled LaTeX_OCR sample, the tiny preset):

  bench/bench_sft.py                   cases (a) Trainer+PEFT and (b) ocrtune with two (b) variants
                                       (fused_lora false/true), each in its own process, and the loss check
  examples/latex_ocr_two_stage.py      --smoke, split in its two device calls (--phase stage1, --phase rest),
                                       and --phase rest without a stage-1 run
Each runs as a subprocess, as on the GPU machine; the assertions are on the JSON reports they write.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ocrtune.data.registry import SAMPLE_DIR

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_sft.py"
TWO_STAGE = REPO / "examples" / "latex_ocr_two_stage.py"
VARIANTS = [{"fused_lora": False}, {"fused_lora": True}]
MEM_KEYS = ("max_allocated_gib", "max_reserved_gib")


def _env() -> dict:
    # OCRTUNE_CACHE (the conftest's temp cache) travels with os.environ
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
                TOKENIZERS_PARALLELISM="false")


def _run(cmd: list[str], cwd: Path, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t = time.time()
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return res, time.time() - t


def _why(res: subprocess.CompletedProcess) -> str:
    return f"rc {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-4000:]}"


# ---------------------------------------------------------------- bench/bench_sft.py

BENCH_ROWS, BENCH_BATCH, BENCH_TOKENS, BENCH_STEPS = 32, 8, 1024, 2


def test_bench_sft_tiny_baseline_and_two_variants(tmp_path, tiny_model_dir):
    # --model_root/q<size> is the model folder; point it at the session's tiny preset (no rebuild)
    root = tmp_path / "models"
    root.mkdir()
    (root / "qtiny").symlink_to(Path(tiny_model_dir).resolve(), target_is_directory=True)
    out = tmp_path / "b.json"
    cmd = [sys.executable, str(BENCH), "--data", str(SAMPLE_DIR / "train.parquet"), "--models", "tiny",
           "--model_root", str(root), "--cases", "ab", "--b_variants", "fused_lora=false;fused_lora=true",
           "--steps", str(BENCH_STEPS), "--warmup", "1", "--rows", str(BENCH_ROWS),
           "--baseline_batch", str(BENCH_BATCH), "--batch", str(BENCH_BATCH), "--packing_tokens", str(BENCH_TOKENS),
           "--workers", "0", "--timeout", "300", "--out", str(out)]
    res, wall = _run(cmd, tmp_path, 900)
    print(f"bench_sft tiny a + 2 b variants: {wall:.1f}s")
    assert res.returncode == 0, _why(res)
    r = json.loads(out.read_text())
    assert r["b_variants"] == VARIANTS
    assert [e["model"] for e in r["runs"]] == ["tiny"]
    e = r["runs"][0]

    # (a) Trainer + PEFT, padded batches of --baseline_batch rows
    a = e["a"]
    assert "error" not in a, a
    assert a["case"] == "a_trainer_peft"
    assert a["steps_timed"] == BENCH_STEPS and a["batch"] == BENCH_BATCH
    assert a["samples_per_step"] == BENCH_BATCH
    assert a["samples_per_s"] > 0 and a["tokens_per_s"] > 0 and a["seconds"] > 0
    assert a["padded_tokens_per_s"] >= a["tokens_per_s"]  # right-padded rows: pads are counted apart
    assert all(k in a for k in MEM_KEYS)
    assert math.isfinite(a["check_loss"]) and a["check_loss"] > 0

    # (b) ocrtune, one process per variant, in the order given
    b_all = e["b_all"]
    assert [b.get("overrides") for b in b_all] == VARIANTS
    for b, ov in zip(b_all, VARIANTS):
        assert "error" not in b, b
        assert b["case"] == "b_ocrtune"
        assert b["effective"] == ov  # the override reached SftArgs
        assert b["steps_timed"] == BENCH_STEPS and b["rows"] == BENCH_ROWS
        assert b["packing_tokens"] == BENCH_TOKENS and b["workers"] == 0
        assert b["samples_per_s"] > 0 and b["tokens_per_s"] > 0 and b["seconds"] > 0
        assert all(k in b for k in MEM_KEYS)
        if b["device"] == "cpu":
            assert b["max_allocated_gib"] is None and b["max_reserved_gib"] is None
        # padding-free packing: every token trained is a real token, and a step stays within the budget
        assert b["padded_tokens_per_s"] == b["tokens_per_s"]
        assert b["tokens_per_sample"] * b["samples_per_step"] <= BENCH_TOKENS * 1.01
        # the fixed-batch loss check against (a): same rows, same weights (LoRA B starts at zero)
        lc = b["loss_check"]
        assert lc["a"] == a["check_loss"] and lc["b"] == b["check_loss"]
        assert lc["rel_diff"] == pytest.approx(abs(b["check_loss"] - a["check_loss"]) / abs(a["check_loss"]), rel=1e-9, abs=1e-15)
        assert lc["pass"] is True and lc["rel_diff"] <= 1e-2
        if b["device"] == "cpu":  # fp32 on both sides: only summation order differs
            assert lc["rel_diff"] <= 1e-5, lc
        assert b["eligible"] is True and "not_eligible" not in b
        assert b["vs_a"] == round(b["samples_per_s"] / a["samples_per_s"], 2)

    # fused LoRA is the same math as PEFT's forward
    l0, l1 = b_all[0]["check_loss"], b_all[1]["check_loss"]
    assert abs(l0 - l1) <= 1e-5 * abs(l0), (l0, l1)

    # the chosen (b): one of the variants, the fastest eligible one
    assert e["b"] in b_all
    assert e["b_pick"] == "fastest eligible"
    assert e["b"]["samples_per_s"] == max(b["samples_per_s"] for b in b_all)
    assert e["loss_check"]["pass"] is True and e["loss_check"]["b"] == e["b"]["check_loss"]
    assert e["ratio_samples_per_s"] == round(e["b"]["samples_per_s"] / a["samples_per_s"], 2)
    assert r["wall_s"] > 0


# ---------------------------------------------------------------- examples/latex_ocr_two_stage.py --smoke

# what --smoke fixes (parse_args): stage-1 / stage-2 steps, validation rows of the evaluations
SMOKE_STAGE1_STEPS, SMOKE_STAGE2_STEPS, SMOKE_EVAL_ROWS = 8, 4, 12
EVALS = ("eval_stage1_print", "eval_stage1_handwrite", "eval_stage2_handwrite")


def _data_dir(root: Path) -> Path:
    data = root / "data"
    for subset in ("print", "handwrite"):
        (data / subset).mkdir(parents=True)
        for split in ("train", "validation"):
            shutil.copy(SAMPLE_DIR / f"{split}.parquet", data / subset / f"{split}.parquet")
    return data


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory):
    """Both phases of the smoke run, as two calls sharing --work_dir."""
    root = tmp_path_factory.mktemp("two_stage")
    data, work = _data_dir(root), root / "work"
    runs = {}
    for phase, report in (("stage1", "r1"), ("rest", "r2")):
        cmd = [sys.executable, str(TWO_STAGE), "--smoke", "--phase", phase, "--data_dir", str(data),
               "--work_dir", str(work), "--report_dir", str(root / report)]
        res, wall = _run(cmd, root, 900)
        print(f"latex_ocr_two_stage --smoke --phase {phase}: {wall:.1f}s")
        runs[phase] = res
    return {"root": root, "work": work, "r1": root / "r1", "r2": root / "r2", "runs": runs}


def test_two_stage_smoke_phases_exit_0_and_report_metrics(two_stage):
    for phase, res in two_stage["runs"].items():
        assert res.returncode == 0, f"phase {phase}: " + _why(res)
    r1 = json.loads((two_stage["r1"] / "report.json").read_text())
    r2 = json.loads((two_stage["r2"] / "report.json").read_text())
    assert r1["phase"] == "stage1" and r1["errors"] == [] and r1["evals"] == {}
    assert (two_stage["work"] / "stage1_state.json").exists()
    assert r2["phase"] == "rest" and r2["errors"] == [], r2["errors"]
    assert list(r2["phases"]) == ["stage1", "rest"]
    assert r2["settings"]["smoke"] is True and r2["settings"]["model"] == "tiny"

    assert set(r2["evals"]) == set(EVALS)
    for name in EVALS:
        ev = r2["evals"][name]
        assert ev["count"] == SMOKE_EVAL_ROWS, (name, ev)
        for k in ("bleu4", "token_acc", "exact_match", "edit_distance_token"):
            assert isinstance(ev[k], (int, float)) and 0.0 <= ev[k] <= 1.0, (name, k, ev)
    assert r2["evals"]["eval_stage1_print"]["ckpt_dir"] == r2["stage1_checkpoint"]
    assert r2["evals"]["eval_stage2_handwrite"]["ckpt_dir"] == r2["stage2_checkpoint"]
    # targets are computed from those evaluations
    t = r2["targets"]
    assert t["print_bleu4"]["value"] == r2["evals"]["eval_stage1_print"]["bleu4"]
    assert t["handwrite_bleu4_gain"]["value"] == pytest.approx(
        r2["evals"]["eval_stage2_handwrite"]["bleu4"] - r2["evals"]["eval_stage1_handwrite"]["bleu4"], abs=1e-6)

    # the smoke run's fixed steps, from each stage's own training log
    assert r2["stage1"]["steps"] == SMOKE_STAGE1_STEPS and r2["stage2"]["steps"] == SMOKE_STAGE2_STEPS
    assert Path(r2["stage1_checkpoint"]).name == f"checkpoint-{SMOKE_STAGE1_STEPS}"
    assert Path(r2["stage2_checkpoint"]).name == f"checkpoint-{SMOKE_STAGE2_STEPS}"
    assert r2["stage1"]["exit_code"] == 0 and r2["stage2"]["exit_code"] == 0
    for s in ("stage1", "stage2"):
        assert all(math.isfinite(x["loss"]) for x in r2[s]["log"]["train"])
    # both calls' timings: the stage-1 call's steps merged in
    assert r2["timings_s"]["stage1_sft"] == r1["timings_s"]["stage1_sft"]
    assert r2["timings_s"]["total"] == pytest.approx(r2["timings_s"]["phase_stage1"] + r2["timings_s"]["phase_rest"], abs=0.11)


def test_two_stage_smoke_commands_in_order(two_stage):
    r1 = json.loads((two_stage["r1"] / "report.json").read_text())
    r2 = json.loads((two_stage["r2"] / "report.json").read_text())
    names = list(r2["commands"])
    order = ["probe", "stage1_sft", "eval_stage1_print", "eval_stage1_handwrite", "stage2_sft", "eval_stage2_handwrite"]
    assert [n for n in names if n in order] == order, names
    # the stage-1 call's commands are those that call ran
    assert r2["commands"]["stage1_sft"] == r1["commands"]["stage1_sft"]
    assert "stage2_sft" not in r1["commands"]

    s1 = shlex.split(r2["commands"]["stage1_sft"])
    s2 = shlex.split(r2["commands"]["stage2_sft"])
    assert s1[:2] == ["ocrtune", "sft"] and s2[:2] == ["ocrtune", "sft"]
    opt = lambda toks, k: toks[toks.index(k) + 1]  # noqa: E731
    assert opt(s1, "--model") == "tiny" and opt(s1, "--train_type") == "full"
    assert opt(s1, "--max_steps") == str(SMOKE_STAGE1_STEPS)
    assert opt(s2, "--model") == r2["stage1_checkpoint"]  # stage 2 starts from stage 1's checkpoint
    assert opt(s2, "--train_type") == "lora" and opt(s2, "--max_steps") == str(SMOKE_STAGE2_STEPS)
    assert "print/train.parquet" in opt(s1, "--dataset") and "handwrite/train.parquet" in opt(s2, "--dataset")

    # results.md lists the same commands, in the same order
    md = (two_stage["r2"] / "results.md").read_text()
    pos = [md.index(r2["commands"][n]) for n in order]
    assert pos == sorted(pos)


def test_two_stage_smoke_artifacts(two_stage):
    from PIL import Image
    for d in ("r1", "r2"):
        assert (two_stage[d] / "results.md").read_text().startswith("## Results on LaTeX_OCR")
        with Image.open(two_stage[d] / "curves.png") as im:
            im.verify()
        assert (two_stage[d] / "log.txt").stat().st_size > 0
    with Image.open(two_stage["r1"] / "curves.png") as c1, Image.open(two_stage["r2"] / "curves.png") as c2:
        assert c1.format == c2.format == "PNG"
        # one row of plots a stage: the full report's figure has both stages, the stage-1 one only the first
        assert c2.size[0] == c1.size[0] and c2.size[1] == 2 * c1.size[1], (c1.size, c2.size)
    md = (two_stage["r2"] / "results.md").read_text()
    assert "| stage 2 (+ LoRA, handwrite) | handwrite validation | 12 |" in md
    preds = [json.loads(x) for x in (two_stage["r2"] / "predictions.jsonl").read_text().splitlines()]
    assert {p["eval"] for p in preds} == set(EVALS)
    # the rest call's log.txt carries the stage-1 call's log first
    log = (two_stage["r2"] / "log.txt").read_text()
    assert log.index("==== phase stage1") < log.index("==== phase rest ====")


def test_two_stage_rest_without_stage1_is_a_one_line_error(tmp_path):
    work = tmp_path / "empty_work"
    work.mkdir()
    cmd = [sys.executable, str(TWO_STAGE), "--smoke", "--phase", "rest", "--data_dir", str(tmp_path / "data"),
           "--work_dir", str(work), "--report_dir", str(tmp_path / "r")]
    res, _ = _run(cmd, tmp_path, 120)
    assert res.returncode == 2, _why(res)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1, res.stderr
    assert err[0].startswith("error: no finished stage-1 run in ") and "--phase stage1" in err[0]
    assert "Traceback" not in res.stderr + res.stdout
    assert not (tmp_path / "r").exists()  # nothing written for a call that could not start
