"""CPU runs of the two GPU recipes, on what the package ships (the bundled LaTeX_OCR sample, the tiny preset):

  bench/bench_sft.py                   cases (a) Trainer+PEFT and (b) ocrtune with two (b) variants
                                       (fused_lora false/true), each in its own process, and the loss check
  examples/latex_ocr_from_scratch.py   --smoke, split in its two device calls (--phase train, --phase rest),
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
import types
from pathlib import Path

import pytest

from ocrtune.data.registry import SAMPLE_DIR

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_sft.py"
FROM_SCRATCH = REPO / "examples" / "latex_ocr_from_scratch.py"
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


# ---------------------------------------------------------------- bench/bench_frontier.py

def test_bench_frontier_tiny_grid(tmp_path, tiny_model_dir):
    """The speed-memory frontier on CPU: every setting of the grid trains, with the recompute layers asked for."""
    out = tmp_path / "f.json"
    cmd = [sys.executable, str(REPO / "bench" / "bench_frontier.py"), "--model", "tiny", "--rows", "32",
           "--data", str(SAMPLE_DIR / "train.parquet"), "--grid", "512:all,0;1024:1", "--steps", "2", "--warmup", "1",
           "--out", str(out)]
    res, wall = _run(cmd, tmp_path, 600)
    print(f"bench_frontier tiny: {wall:.1f}s")
    assert res.returncode == 0, _why(res)
    r = json.loads(out.read_text())
    got = [(s["packing_tokens"], s["recompute"], s["recompute_layers"], s["ok"]) for s in r["settings"]]
    assert got == [(512, "all", 2, True), (512, "0", 0, True), (1024, "1", 1, True)]  # tiny has 2 decoder layers
    for s in r["settings"]:
        assert s["steps_timed"] == 2 and s["samples_per_s"] > 0 and s["tokens_per_s"] > s["samples_per_s"]
        assert s["tokens_per_s"] / s["samples_per_s"] <= s["packing_tokens"]  # a packed step holds at most the budget
    # the fixed batch's loss of a random 1024-token model: near ln(1024) = 6.93, surely within (0, 2 ln V)
    assert 0 < r["check_loss"] < 2 * math.log(1024)
    assert r["liger_applied"] is False  # CPU: Liger's Triton kernels fall back


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


# ---------------------------------------------------------------- examples/latex_ocr_from_scratch.py --smoke

SMOKE_STAGE1_STEPS, SMOKE_STAGE2_STEPS, SMOKE_EVAL_ROWS = 6, 4, 8  # what --smoke fixes (parse_args)


def _data_dir(root: Path) -> Path:
    data = root / "data"
    for subset in ("print", "handwrite"):
        (data / subset).mkdir(parents=True)
        for split in ("train", "validation"):
            shutil.copy(SAMPLE_DIR / f"{split}.parquet", data / subset / f"{split}.parquet")
    return data


@pytest.fixture(scope="module")
def from_scratch(tmp_path_factory):
    """Both phases of the smoke run as two calls sharing --work_dir, with one extra evaluation set; stage 1 as
    the recipe's default, LoRA over the random weights (rank 4 here), merged in phase rest."""
    if shutil.which("pdflatex") is None:
        pytest.skip("LaTeX is not installed (apt-get install texlive-latex-base texlive-latex-recommended)")
    root = tmp_path_factory.mktemp("from_scratch")
    work = root / "work"
    data = work / "smoke_data"  # --smoke without --data_dir: the bundled rows, as the README's smoke command runs it
    extra = root / "extra.parquet"
    shutil.copy(SAMPLE_DIR / "validation.parquet", extra)
    runs = {}
    for phase in ("train", "rest"):
        cmd = [sys.executable, str(FROM_SCRATCH), "--smoke", "--phase", phase, "--stage1_lora_rank", "4",
               "--work_dir", str(work), "--report_dir", str(root / phase), "--extra_eval", f"heldout={extra}",
               *(["--grpo_seconds", "10"] if phase == "rest" else [])]
        res, wall = _run(cmd, root, 900)
        print(f"latex_ocr_from_scratch --smoke --phase {phase}: {wall:.1f}s")
        assert res.returncode == 0, f"phase {phase}: " + _why(res)
        runs[phase] = json.loads((root / phase / "report.json").read_text())
    return {"root": root, "work": work, "data": data, **runs}


def test_from_scratch_report_has_the_issue_shape(from_scratch):
    r = from_scratch["rest"]
    assert r["errors"] == [], r["errors"]
    for key in ("print", "handwrite_before", "handwrite_after"):
        assert r[key]["count"] == SMOKE_EVAL_ROWS, (key, r[key])
    assert set(r["extra"]) == {"heldout"} and r["extra"]["heldout"]["count"] == 40  # the whole extra set
    for e in (r["print"], r["handwrite_before"], r["handwrite_after"], r["extra"]["heldout"]):
        for k in ("bleu4", "exact_match", "token_acc", "edit_distance"):
            assert 0.0 <= e[k] <= 1.0, (k, e)
    assert r["targets"]["handwrite_bleu4_gain"]["value"] == pytest.approx(
        r["handwrite_after"]["bleu4"] - r["handwrite_before"]["bleu4"], abs=1e-6)
    assert list(r["phases"]) == ["train", "rest"] and r["command"].count("--phase") == 2
    # the optional GRPO stage (--grpo_seconds): its steps, and print evaluated with CDM before and after it
    assert r["grpo"]["steps"] >= 1, r["grpo"]
    for e in (r["print"], r["print_after_grpo"]):
        assert e["count"] == SMOKE_EVAL_ROWS and 0.0 <= e["exprate_cdm"] <= e["cdm"] <= 1.0, e
    assert r["device"].startswith("cpu")
    # the bundled sample's validation formulas are none of its train formulas, so the "unseen" subset is every
    # row, and the recipe's own metrics over it must give what `ocrtune eval` reported for the whole set
    assert r["handwrite_seen_in_train"] == 0
    for key in ("handwrite_before", "handwrite_after"):
        unseen, whole = r[f"{key}_unseen"], r[key]
        assert unseen["count"] == whole["count"] == SMOKE_EVAL_ROWS
        for k in ("bleu4", "exact_match", "edit_distance"):
            assert unseen[k] == pytest.approx(whole[k], abs=1e-6), (key, k, unseen, whole)


def test_from_scratch_trains_on_synthetic_rows_that_exclude_evaluation_formulas(from_scratch):
    import pyarrow.parquet as pq
    r = from_scratch["rest"]
    assert r["synth"]["rows"] > 0 and r["stage1"]["steps"] == SMOKE_STAGE1_STEPS
    assert r["stage2"]["steps"] == SMOKE_STAGE2_STEPS
    stage1 = shlex.split(r["commands"]["stage1"].split("ocrtune ", 1)[1])
    assert str(from_scratch["work"] / "synth") in stage1[stage1.index("--dataset") + 1:]
    synth_cmd = shlex.split(r["commands"]["synth"].split("ocrtune ", 1)[1])
    assert float(synth_cmd[synth_cmd.index("--scramble") + 1]) == 0.5  # half the synthetic formulas scrambled
    synth = {" ".join(t.split()) for f in (from_scratch["work"] / "synth").glob("*.parquet")
             for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()}
    held = {" ".join(t.split()) for t in pq.read_table(SAMPLE_DIR / "validation.parquet", columns=["text"]).column("text").to_pylist()}
    assert synth and not synth & held
    assert all(math.isfinite(x["loss"]) for x in r["stage1"]["train_log"])
    assert Path(r["stage1_checkpoint"]).name == f"checkpoint-{SMOKE_STAGE1_STEPS}-merged"


def test_from_scratch_stage1_spans_both_phases(from_scratch):
    """Stage 1's schedule is planned over both device calls: phase train stops it with `ocrtune sft --max_time`
    (--smoke: 0 s, so after its first step), saving that step, and phase rest resumes the same run
    (`--resume_from_checkpoint last`) to its last planned step before anything is evaluated. The log is one
    run's: steps 1 to the end, the learning rate following one schedule."""
    train, rest = from_scratch["train"], from_scratch["rest"]
    assert train["stage1_planned_steps"] == SMOKE_STAGE1_STEPS and train["stage1_steps_in_phase_train"] == 1
    assert "--max_time 0.0" in train["commands"]["stage1"] and train["errors"] == []
    resumed = shlex.split(rest["commands"]["stage1_resumed"].split("ocrtune ", 1)[1])
    first = shlex.split(rest["commands"]["stage1"].split("ocrtune ", 1)[1])
    assert resumed[:len(first) - 2] == first[:-2]  # the same command, less its --max_time, ...
    assert resumed[-4:-2] == ["--resume_from_checkpoint", "last"] and resumed[-2] == "--max_time"  # ... resumed
    assert float(resumed[-1]) > 0
    log = rest["stage1"]["train_log"]
    assert [x["step"] for x in log] == list(range(1, SMOKE_STAGE1_STEPS + 1))
    lrs = [x["learning_rate"] for x in log]
    assert lrs[-1] < max(lrs)  # warm-up then cosine decay over the six steps, across the two processes
    assert rest["stage1"]["steps"] == SMOKE_STAGE1_STEPS


def test_from_scratch_rest_without_stage1_is_a_one_line_error(tmp_path, capsys):
    code = _recipe_module().main(["--smoke", "--phase", "rest", "--data_dir", str(_data_dir(tmp_path)),
                                  "--work_dir", str(tmp_path / "empty"), "--report_dir", str(tmp_path / "r")])
    assert code == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: no finished stage-1 checkpoint in {tmp_path / 'empty' / 'stage1'}: run --phase train first"]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert any("no finished stage-1 checkpoint" in e for e in report["errors"]), report["errors"]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert any("no finished stage-1 checkpoint" in e for e in report["errors"]), report["errors"]


def test_from_scratch_without_its_data_is_one_line_before_any_step(tmp_path, capsys):
    """The README's command named a --data_dir no step creates: every step failed in turn, then an empty report."""
    mod = _recipe_module()
    data = tmp_path / "data" / "latex_ocr"
    (data / "print").mkdir(parents=True)
    shutil.copy(SAMPLE_DIR / "train.parquet", data / "print" / "train.parquet")
    code = mod.main(["--smoke", "--phase", "all", "--data_dir", str(data), "--work_dir", str(tmp_path / "w"),
                     "--report_dir", str(tmp_path / "r")])
    assert code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: --data_dir {data} lacks print/validation.parquet, handwrite/train.parquet, handwrite/validation.parquet; "
        "give the folder that holds print/ and handwrite/ {train,validation}.parquet (LaTeX_OCR's subsets), or run "
        "--smoke without --data_dir to use the bundled sample rows"]
    assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()  # nothing ran, no report


def test_from_scratch_smoke_without_data_dir_uses_the_bundled_rows(tmp_path):
    mod = _recipe_module()
    a = mod.parse_args(["--smoke", "--phase", "all", "--work_dir", str(tmp_path / "w"), "--report_dir", str(tmp_path / "r")])
    assert Path(a.data_dir) == tmp_path / "w" / "smoke_data"
    mod.check_data_dir(a.data_dir)  # all four files there
    for subset in ("print", "handwrite"):
        for split in ("train", "validation"):
            assert (Path(a.data_dir) / subset / f"{split}.parquet").read_bytes() == (SAMPLE_DIR / f"{split}.parquet").read_bytes()
    assert mod.parse_args(["--phase", "all"]).data_dir == ".carry/latex"  # the GPU runs' default is unchanged


def test_from_scratch_stops_at_the_first_failed_step(tmp_path, monkeypatch, capsys):
    """A failed step stops the recipe with one line naming it; no later step runs."""
    mod = _recipe_module()
    monkeypatch.setattr(mod.Recipe, "ocrtune_command", lambda self, args: [
        sys.executable, "-c", "print('rendering...'); print('error: pdflatex was not found'); raise SystemExit(3)"])
    work, report = tmp_path / "w", tmp_path / "r"
    code = mod.main(["--smoke", "--phase", "all", "--work_dir", str(work), "--report_dir", str(report)])
    err = capsys.readouterr().err.splitlines()
    assert code == 1
    assert err == [f"error: synth failed (exit 3): error: pdflatex was not found; see {work / 'synth.log'}"]
    r = json.loads((report / "report.json").read_text())
    assert list(r["commands"]) == ["synth"]  # neither the probe nor stage 1 started
    assert r["errors"] == ["synth: exit 3: rendering... | error: pdflatex was not found"]


def test_from_scratch_stage1_as_lora_is_merged_before_stage2(from_scratch):
    """--stage1_lora_rank: stage 1 trains LoRA over the random weights (lr 1e-3) with the tied embeddings trained
    whole (--stage1_modules_to_save embed_tokens), phase rest merges it, and the evaluations and stage 2 run on the
    merged model, in which only the LoRA targets and the embeddings changed."""
    import torch
    from safetensors.torch import load_file
    r = from_scratch["rest"]
    stage1 = shlex.split(r["commands"]["stage1"].split("ocrtune ", 1)[1])
    assert stage1[stage1.index("--train_type") + 1] == "lora" and float(stage1[stage1.index("--learning_rate") + 1]) == 1e-3
    # ReLoRA in 5 cycles of ceil(6 / 5) = 2 steps: the last checkpoint carries the folded base it was merged onto
    assert stage1[stage1.index("--relora_steps") + 1] == "2"
    merged = Path(r["stage1_checkpoint"])
    assert (merged.parent / f"checkpoint-{SMOKE_STAGE1_STEPS}" / "relora_base.safetensors").exists()
    assert merged.name == f"checkpoint-{SMOKE_STAGE1_STEPS}-merged"
    stage2 = shlex.split(r["commands"]["stage2"].split("ocrtune ", 1)[1])
    assert stage2[stage2.index("--model") + 1] == str(merged) and r["stage2"]["steps"] == SMOKE_STAGE2_STEPS
    adapter = json.loads((merged.parent / f"checkpoint-{SMOKE_STAGE1_STEPS}" / "adapter_config.json").read_text())
    base = load_file(Path(adapter["base_model_name_or_path"]) / "model.safetensors")
    after = load_file(merged / "model.safetensors")
    assert set(after) == set(base)
    changed = {k for k in base if not torch.equal(base[k], after[k])}
    embeddings = {k for k in changed if k.endswith("embed_tokens.weight")}
    assert len(embeddings) == 1 and "lm_head.weight" not in after  # trained, and still tied to lm_head
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "fc1", "fc2")
    lora = changed - embeddings
    assert lora and all(k.endswith(".weight") and any(f".{t}." in k for t in targets) for k in lora), sorted(lora)
    assert not any("merger" in k for k in changed)


def _script_module(path: Path):
    """A script of the repo (not a package module) imported by its path."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _recipe_module():
    return _script_module(FROM_SCRATCH)


def test_from_scratch_stage1_lora_rank_0_is_full_fine_tuning_at_1e4(tmp_path):
    """--stage1_lora_rank 0: stage 1 is `ocrtune sft --train_type full` with the vision tower trained, at lr 1e-4
    (full fine-tuning at 1e-3 collapses the image features); the default is LoRA at 1e-3."""
    mod = _recipe_module()
    base = ["--smoke", "--phase", "train", "--data_dir", str(_data_dir(tmp_path)), "--work_dir", str(tmp_path / "w"),
            "--report_dir", str(tmp_path / "r")]
    for flags, kind, lr in ((["--stage1_lora_rank", "0"], "full", 1e-4), ([], "lora", 1e-3)):
        recipe = mod.Recipe(mod.parse_args(base + flags))
        args = recipe.stage1_args(6, ["d"], tmp_path / "out")
        assert args[args.index("--train_type") + 1] == kind and float(args[args.index("--learning_rate") + 1]) == lr
        assert ("--freeze_vit" in args and args[args.index("--freeze_vit") + 1] == "false") == (kind == "full")
        assert ("--lora_rank" in args) == (kind == "lora")
        assert (args[args.index("--modules_to_save") + 1] == "embed_tokens") if kind == "lora" else "--modules_to_save" not in args


def test_from_scratch_unseen_handwriting_uses_stage2s_sample_and_skips_failed_rows(tmp_path):
    """The "formulas not in handwrite train" metrics compare against the rows stage 2 trained on (`train#48` is a
    seeded sample, not the first 48 rows) and leave out rows without a prediction, as `ocrtune eval` does."""
    import pyarrow.parquet as pq

    from ocrtune.data.loading import load_dataset
    mod = _recipe_module()
    data = _data_dir(tmp_path)
    recipe = mod.Recipe(mod.parse_args(["--smoke", "--phase", "rest", "--data_dir", str(data), "--work_dir",
                                        str(tmp_path / "work"), "--report_dir", str(tmp_path / "r")]))
    norm = lambda t: " ".join(t.split())  # noqa: E731
    sample = {norm(m[-1]["content"]) for m in load_dataset(recipe.path("handwrite", "train"))["messages"]}
    rows = [norm(t) for t in pq.read_table(data / "handwrite" / "train.parquet", columns=["text"]).column("text").to_pylist()]
    prefix = set(rows[:48])
    seen = [t for t in dict.fromkeys(rows) if t in sample and t not in prefix][:3]      # trained on, past row 48
    unseen = [t for t in dict.fromkeys(rows) if t not in sample and t in prefix][:3]    # in the first 48, not trained on
    assert len(seen) == len(unseen) == 3
    (recipe.work / "eval").mkdir(parents=True)
    for name in ("stage1_handwrite", "stage2_handwrite"):
        lines = [{"index": i, "reference": t, "prediction": t} for i, t in enumerate(seen)]
        lines += [{"index": 3 + i, "reference": t, "prediction": "x"} for i, t in enumerate(unseen)]
        lines += [{"index": 6, "reference": unseen[0], "prediction": None, "error": "generation failed"}]
        (recipe.work / "eval" / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = recipe.unseen_handwriting({"stage1_handwrite", "stage2_handwrite"})
    assert out["handwrite_seen_in_train"] == 3
    for key in ("handwrite_before_unseen", "handwrite_after_unseen"):
        assert out[key]["count"] == 3 and out[key]["exact_match"] == 0.0, out[key]
    assert recipe.unseen_handwriting({"stage1_handwrite"}).keys() == {"handwrite_seen_in_train", "handwrite_before_unseen"}


def test_from_scratch_stage2_plan_is_per_step_whatever_stage1s_tokens(tmp_path):
    """Stage 2's steps for --stage2_seconds come from the probe's seconds a step (0.8x at batch 32), not from stage
    1's samples a step: run 9 (32,768 tokens a step) planned 2,731 steps that way and ran out of time at half."""
    mod = _recipe_module()
    base = ["--phase", "rest", "--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"), "--report_dir",
            str(tmp_path / "r"), "--deadline_seconds", "600"]
    for tokens in ("16384", "32768"):
        recipe = mod.Recipe(mod.parse_args(base + ["--packing_tokens", tokens]))
        recipe.report["probe"] = {"seconds_per_step": 0.2163}
        assert recipe.plan_stage2() == int(70 / (0.8 * 0.2163))  # 404: --stage2_seconds 70 at ~0.173 s a step
    recipe = mod.Recipe(mod.parse_args(base + ["--stage2_batch_size", "64"]))
    recipe.report["probe"] = {"seconds_per_step": 0.2163}
    assert recipe.plan_stage2() == int(70 / (0.8 * 0.2163 * 2))


def test_from_scratch_stage1_plan_keeps_the_rest_of_phase_all_and_spans_two_calls_in_phase_train(tmp_path, monkeypatch):
    """Phase train plans stage 1 over this call and --stage1_rest_seconds of the next and stops it 45 s before its
    deadline; phase all (one process, e.g. an hour on one's own GPU) keeps --rest_reserve_seconds of its deadline
    for the merge, evaluations and stage 2, in the plan and in --max_time (it once planned the whole deadline)."""
    mod = _recipe_module()
    base = ["--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"), "--report_dir", str(tmp_path / "r"),
            "--deadline_seconds", "3600", "--rest_reserve_seconds", "200", "--stage1_rest_seconds", "300"]
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(time=lambda: 1000.0))  # the recipe's clock, frozen
    monkeypatch.setenv("LATEX_OCR_T0", "1000.0")
    plans = {}
    for phase in ("train", "all"):
        recipe = mod.Recipe(mod.parse_args(base + ["--phase", phase]))
        recipe.report["probe"] = {"startup_seconds": 25.0}
        plans[phase] = recipe.plan_stage1(0.25)
    fixed = 25 + 30 + 4 * 5 + 25
    assert plans["train"] == (int((3600 - fixed + 300) / (1.1 * 0.25)), 3600 - 45, 3600 - 5)
    assert plans["all"] == (int((3600 - fixed - 200) / (1.1 * 0.25)), 3600 - 220, 3600 - 170)


def test_from_scratch_given_pace_skips_the_probe_and_plans_as_a_probe_would(tmp_path, monkeypatch):
    """--stage1_seconds_per_step: stage 1 is planned from the given pace (and run 12's probe start-up) without the
    probe's run, and stage 2 from the same pace."""
    mod = _recipe_module()
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(time=lambda: 1000.0))
    monkeypatch.setenv("LATEX_OCR_T0", "1000.0")
    recipe = mod.Recipe(mod.parse_args(["--phase", "train", "--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"),
                                        "--report_dir", str(tmp_path / "r"), "--deadline_seconds", "560",
                                        "--stage1_seconds_per_step", "0.2"]))
    monkeypatch.setattr(recipe, "probe", lambda: pytest.fail("the probe ran"))
    assert recipe.pace() == 0.2 and recipe.report["probe"]["given"] is True
    fixed = 35.4 + 30 + 4 * 5 + 25
    assert recipe.plan_stage1(0.2) == (int((560 - fixed + 360) / (1.1 * 0.2)), 560 - 45, 560 - 5)
    assert recipe.plan_stage2() == int(70 / (0.8 * 0.2))


def test_from_scratch_compiled_stage1_plans_its_compiling_in(tmp_path, monkeypatch):
    """--stage1_torch_compile true: stage 1 runs `ocrtune sft --torch_compile true`, and its plan leaves out the
    seconds its first steps compile, cold in phase train and warm in phase rest's resumed run
    (--stage1_compile_seconds; after a probe, which compiled first, warm in both); auto is off without a GPU, and then
    nothing is left out."""
    mod = _recipe_module()
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(time=lambda: 1000.0))
    monkeypatch.setenv("LATEX_OCR_T0", "1000.0")
    monkeypatch.setattr(mod, "gpu_count", lambda: 0)
    base = ["--phase", "train", "--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"), "--report_dir",
            str(tmp_path / "r"), "--deadline_seconds", "560", "--stage1_seconds_per_step", "0.2"]
    fixed = 35.4 + 30 + 4 * 5 + 25
    for flags, compiled, cold, warm in (([], False, 0, 0), (["--stage1_torch_compile", "true"], True, 70, 35),
                                        (["--stage1_torch_compile", "true", "--stage1_compile_seconds", "90", "30"],
                                         True, 90, 30)):
        recipe = mod.Recipe(mod.parse_args(base + flags))
        args = recipe.stage1_args(6, ["d"], tmp_path / "out")
        assert args[args.index("--torch_compile") + 1] == str(compiled).lower()
        recipe.pace()
        assert recipe.plan_stage1(0.2)[0] == int((560 - fixed - cold + 360 - warm) / (1.1 * 0.2))
        recipe.report["probe"] = {"seconds_per_step": 0.2, "startup_seconds": 35.4}  # a probe ran (and compiled)
        assert recipe.plan_stage1(0.2)[0] == int((560 - fixed - warm + 360 - warm) / (1.1 * 0.2))


def test_from_scratch_by_time_holds_stage1s_rate_then_decays_it_by_the_clock_in_phase_rest(tmp_path, monkeypatch):
    """--schedule_by time (the default without fixed steps): no probe (a guessed pace sizes the ReLoRA cycles and
    the evaluations only); stage 1 warms up and holds its rate (constant, --max_steps a bound at 10x the estimate),
    phase rest resumes it with --lr_decay_seconds equal to its --max_time (decay from its first step to the end),
    and stage 2 decays over its own seconds."""
    mod = _recipe_module()
    monkeypatch.setattr(mod, "time", types.SimpleNamespace(time=lambda: 1000.0))
    monkeypatch.setenv("LATEX_OCR_T0", "1000.0")
    monkeypatch.setattr(mod, "gpu_count", lambda: 0)
    base = ["--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"), "--report_dir", str(tmp_path / "r"),
            "--deadline_seconds", "560"]
    recipe = mod.Recipe(mod.parse_args(base + ["--phase", "train"]))
    monkeypatch.setattr(recipe, "probe", lambda: pytest.fail("the probe ran"))
    assert recipe.pace() == mod.GUESSED_PACE
    steps = recipe.plan_stage1(mod.GUESSED_PACE)[0]
    assert steps == int((560 - (35.4 + 30 + 4 * 5 + 25) + 360) / (1.1 * mod.GUESSED_PACE))
    args = recipe.stage1_args(steps, ["d"], tmp_path / "out")
    flag = lambda f: args[args.index(f) + 1]  # noqa: E731
    assert flag("--lr_scheduler_type") == "constant" and "--warmup_ratio" not in args
    assert int(flag("--warmup_steps")) == math.ceil(0.03 * steps) and int(flag("--max_steps")) == 10 * steps
    assert int(flag("--relora_steps")) == -(-steps // 5) and int(flag("--eval_steps")) == -(-steps // 4)
    # by steps (or with fixed steps): the cosine over the planned steps, as before
    for extra in (["--schedule_by", "steps"], ["--stage1_steps", "600"]):
        r = mod.Recipe(mod.parse_args(base + ["--phase", "train", *extra]))
        a2 = r.stage1_args(600, ["d"], tmp_path / "out")
        assert "--lr_scheduler_type" not in a2 and a2[a2.index("--max_steps") + 1] == "600"

    rest = mod.Recipe(mod.parse_args(base + ["--phase", "rest"]))
    rest.report.update(stage1_by_time=True, stage1_args=args, stage1_planned_steps=10 * steps)
    ckpt = tmp_path / "w" / "stage1" / "checkpoint-420"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    ran = {}
    monkeypatch.setattr(rest, "run", lambda name, cmd, **kw: ran.setdefault(name, cmd) and 0)
    rest.resume_stage1()
    limit = f"{560 - (140 + 20):.0f}"  # what is left of the deadline less --rest_reserve_seconds and 20 s
    assert ran["stage1_resumed"][len(args):] == ["--resume_from_checkpoint", "last", "--max_time", limit,
                                                 "--lr_decay_seconds", limit]
    s2 = rest.stage2_by_time(400)
    assert s2 == ["--lr_scheduler_type", "constant", "--warmup_steps", "20", "--max_steps", "4000",
                  "--max_time", "70", "--lr_decay_seconds", "70"]


def test_from_scratch_probe_pace_leaves_out_the_epoch_boundary():
    """The probe's pace is read over its second half without the intervals in which an epoch ended (a new epoch's
    loader starting cold). The logs are shaped like run 14's probe: 60 steps logged every 6, 0.26 s a step, 339
    rows a step over 13,918 (an epoch every 41 steps), 3.3 s lost at the boundary."""
    mod = _recipe_module()
    per_epoch, t, logs = 13918 / 339, 10.0, []
    for step in range(6, 61, 6):
        t += 6 * 0.26 + (3.3 if step - 6 < per_epoch <= step else 0.0)
        logs.append({"step": step, "train_speed(iter/s)": step / t, "epoch": round(step / per_epoch, 4)})
    assert mod.probe_pace(logs) == pytest.approx(0.26, rel=1e-9)
    # what the second half as a whole reads (the old pace): 3.3 s spread over its 24 steps
    assert (logs[-1]["step"] / logs[-1]["train_speed(iter/s)"] - logs[5]["step"] / logs[5]["train_speed(iter/s)"]) / 24 \
        == pytest.approx(0.26 + 3.3 / 24)
    # an epoch that ends exactly at a logged step: the interval after it holds the new loader's first fetch
    exact = [{"step": s, "train_speed(iter/s)": s / (10 + 0.26 * s + (3.3 if s > 36 else 0)), "epoch": s / 36}
             for s in range(6, 61, 6)]
    assert mod.probe_pace(exact) == pytest.approx(0.26, rel=1e-9)
    # no interval free of a boundary: all of the half is kept
    short = [{"step": s, "train_speed(iter/s)": s / (0.3 * s), "epoch": s / 5} for s in range(6, 61, 6)]
    assert mod.probe_pace(short) == pytest.approx(0.3)


def test_from_scratch_phase_rest_sees_images_as_phase_train_did(tmp_path):
    """Stage 2 (phase rest) trains with phase train's --min_pixels/--max_pixels unless given again, so a run at more
    visual tokens per image does not fine-tune at fewer; without either phase's flags, the defaults."""
    mod = _recipe_module()
    base = ["--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"), "--report_dir", str(tmp_path / "r")]
    train = mod.Recipe(mod.parse_args(base + ["--phase", "train", "--min_pixels", "60000", "--max_pixels", "240000"]))
    train.state_path.write_text(json.dumps(train.report))
    rest = mod.Recipe(mod.parse_args(base + ["--phase", "rest"]))
    assert (rest.a.min_pixels, rest.a.max_pixels) == (60000, 240000)
    assert rest.sft_common()[:4] == ["--min_pixels", "60000", "--max_pixels", "240000"]
    told = mod.Recipe(mod.parse_args(base + ["--phase", "rest", "--max_pixels", "200000"]))
    assert (told.a.min_pixels, told.a.max_pixels) == (60000, 200000)
    train.state_path.unlink()
    fresh = mod.Recipe(mod.parse_args(base + ["--phase", "train"]))
    assert (fresh.a.min_pixels, fresh.a.max_pixels) == (30000, 120000)


def test_from_scratch_evaluations_started_early_get_until_the_deadline(tmp_path):
    """Evaluations run alongside stage 2 and are waited for afterwards: each may run until `reserve` seconds before
    the phase's deadline however long ago it started (run 10's print evaluation was stopped 48 s in, when the time
    left at the wait was taken as its whole time since its start)."""
    import subprocess
    import time
    mod = _recipe_module()
    recipe = mod.Recipe(mod.parse_args(["--phase", "rest", "--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"),
                                        "--report_dir", str(tmp_path / "r"), "--deadline_seconds", "600"]))
    (recipe.work / "slow_eval.log").write_text("")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    job = {"name": "slow_eval", "proc": proc, "start": time.time() - 500, "logf": open(recipe.work / "slow_eval.log", "a")}
    recipe.t0 = time.time() - 400  # 200 s of the phase left, the job started 500 s ago
    assert recipe.finish_evals([("slow_eval", job)]) == {"slow_eval": None}  # no summary file: nothing to collect
    assert proc.returncode == 0 and recipe.report["errors"] == []


def test_sweep_stage1_variant_is_the_recipes_stage1_with_its_flags(tmp_path):
    """bench/learning/sweep_stage1.py: a variant's command is the recipe's stage 1 with only its flags' effects
    changed, and its summary reads steps and evaluations back from the run's logging.jsonl."""
    sweep = _script_module(REPO / "bench" / "learning" / "sweep_stage1.py")
    mod = sweep.recipe_module()
    base = ["--phase", "train", "--data_dir", str(tmp_path), "--work_dir", str(tmp_path / "w"), "--report_dir",
            str(tmp_path / "r")]
    plain = sweep.variant_args(mod, base, [], 400, ["rows"], tmp_path / "o")
    wide = sweep.variant_args(mod, base, sweep.DEFAULT_VARIANTS["r128_lr5e-4"], 400, ["rows"], tmp_path / "o")
    changed = {plain[i - 1]: (plain[i], wide[i]) for i in range(1, len(plain)) if plain[i] != wide[i]}
    assert changed == {"--lora_rank": ("64", "128"), "--lora_alpha": ("128", "256"), "--learning_rate": ("0.001", "0.0005")}
    assert plain[plain.index("--max_steps") + 1] == "400" and plain[plain.index("--dataset") + 1] == "rows"
    big = sweep.variant_args(mod, base, ["--packing_tokens", "131072", "--stage1_steps", "300"], 400, ["rows"], tmp_path / "o")
    assert big[big.index("--max_steps") + 1] == "300" and big[big.index("--eval_steps") + 1] == "75"  # its own schedule
    assert big[big.index("--packing_tokens") + 1] == "131072"
    run = tmp_path / "run"
    run.mkdir()
    (run / "logging.jsonl").write_text("\n".join(json.dumps(x) for x in (
        {"loss": 2.0, "token_acc": 0.5, "step": 200}, {"eval_loss": 1.5, "eval_acc": 0.6, "step": 200},
        {"loss": 1.0, "token_acc": 0.7, "step": 400}, {"eval_loss": 1.2, "eval_acc": 0.65, "step": 400})) + "\n")
    s = sweep.summarize(mod, run, 120.0)
    assert (s["steps"], s["final_loss"], s["final_token_acc"], s["seconds_per_step_incl_startup"]) == (400, 1.0, 0.7, 0.3)
    assert s["eval_log"] == [{"eval_loss": 1.5, "eval_acc": 0.6, "step": 200}, {"eval_loss": 1.2, "eval_acc": 0.65, "step": 400}]


def test_misreads_counts_main_line_and_script_tokens_apart():
    """bench/learning/misreads.py: braces, `_` and `^` count nowhere; a script is the group or the one token after
    `_`/`^` (nested groups inside it too); the read shares come from the aligned tokens."""
    mis = _script_module(REPO / "bench" / "learning" / "misreads.py")
    ref = "x _ { i { j } } ^ 2 + \\frac { a } { b }".split()
    assert mis.script_mask(ref) == [False, None, None, True, None, True, None, None, None, True, False, False,
                                    None, False, None, None, False, None]
    # main line x + \frac a b (5), scripts i j 2 (3); the prediction drops j and reads b as c
    rates = mis.read_rates([{"reference": " ".join(ref), "prediction": "x _ { i } ^ 2 + \\frac { a } { c }"}])
    assert (rates["main_line_read"], rates["script_read"]) == (0.8, round(2 / 3, 3))


@pytest.mark.parametrize("flag,value", [("--stage2_seconds", "-5"), ("--grpo_seconds", "-1"),
                                        ("--grpo_num_generations", "1"), ("--packing_tokens", "0"),
                                        ("--eval_rows", "0"), ("--synth_scramble", "1.5"), ("--stage2_learning_rate", "nan"),
                                        ("--stage1_compile_seconds", "-1")])
def test_from_scratch_refuses_out_of_range_flags_with_one_error_line(flag, value, capsys):
    mod = _recipe_module()
    args = [flag, value, "0"] if flag == "--stage1_compile_seconds" else [flag, value]
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--phase", "all", *args])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("latex_ocr_from_scratch.py: error:")
           or "error:" in line]
    assert len(err) == 1 and flag in err[0], err
    assert mod.parse_args(["--phase", "all", "--stage2_seconds", "0"]).stage2_seconds == 0.0  # the edge is allowed
