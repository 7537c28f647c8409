#!/usr/bin/env python3
"""GRPO against equal-time SFT on a formula reader: from one model (the from-scratch recipe's merged stage 1 by
default), spend the same seconds (a) continuing SFT on print train and (b) running GRPO with the `cdm` reward on
print train formulas, then evaluate the model before, (a) and (b) on print validation with BLEU-4, exact match and
CDM / ExpRate@CDM. Every step is the real ocrtune command line; the report is one JSON.

    python bench/learning/grpo_vs_sft.py --data_dir .carry/latex --seconds 180 --out $OUT/grpo_vs_sft_h100.json
    python bench/learning/grpo_vs_sft.py --smoke --out r.json     # CPU: the tiny model, a few rows and seconds

--model defaults to the recipe's merged stage-1 model (`.work/from_scratch/state.json`'s stage1_checkpoint, as
after `bash bench/reader_gpu_call.sh B`). Needs pdflatex, or OCRTUNE_TEX_ROOT (the recipe's wrapper unpacks the
carried bundle to /tmp/tex; this script does the same from --tex_bundle when neither is there).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".work" / "grpo_vs_sft"
METRICS = "bleu,exact_match,cdm"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the starting model folder (default: the recipe's merged stage 1)")
    p.add_argument("--data_dir", default=".carry/latex", help="folder with print/{train,validation}.parquet")
    p.add_argument("--seconds", type=float, default=180.0, help="each arm's training time (--max_time)")
    p.add_argument("--eval_rows", type=int, default=None, help="print validation rows (default: all)")
    p.add_argument("--sft_lr", type=float, default=1e-4)
    p.add_argument("--packing_tokens", type=int, default=65536, help="SFT's tokens a step (the recipe's stage 1)")
    p.add_argument("--workers", type=int, default=8, help="SFT's dataloader workers")
    p.add_argument("--grpo_lr", default="2e-5",
                   help="GRPO's learning rate; a comma list runs one GRPO arm per rate, each for --seconds")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--grpo_batch_size", type=int, default=128, help="completions a micro-batch (16 prompts x 8)")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--min_pixels", type=int, default=30_000, help="both arms' image bounds (the recipe's)")
    p.add_argument("--max_pixels", type=int, default=120_000)
    p.add_argument("--tex_bundle", default=".carry/tex/texbundle.tar.xz")
    p.add_argument("--out", required=True, help="the report (JSON)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    a.grpo_lrs = [float(x) for x in str(a.grpo_lr).split(",") if x.strip()]
    if a.smoke:
        a.seconds, a.eval_rows, a.num_generations, a.grpo_batch_size = 20.0, a.eval_rows or 6, 4, 8
        a.packing_tokens, a.workers = 1200, 0
        a.data_dir = a.data_dir if Path(a.data_dir, "print", "train.parquet").is_file() else None
    return a


def stage1_model() -> str:
    state = REPO / ".work" / "from_scratch" / "state.json"
    try:
        return json.loads(state.read_text())["stage1_checkpoint"]
    except (OSError, KeyError, ValueError):
        raise SystemExit(f"error: no --model and no merged stage 1 in {state}; pass --model, or run the recipe first")


def tex_env(bundle: str) -> dict:
    """OCRTUNE_TEX_ROOT for the cdm metric and reward where there is no pdflatex (the carried bundle, unpacked)."""
    if os.environ.get("OCRTUNE_TEX_ROOT") or shutil.which("pdflatex"):
        return {}
    root = Path("/tmp/tex")
    if not (root / "texbundle").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(bundle) as t:
            t.extractall(root, filter="data")
    return {"OCRTUNE_TEX_ROOT": str(root / "texbundle")}


def run(name: str, args: list[str], env: dict, log: Path) -> dict:
    cmd = [sys.executable, "-m", "ocrtune", *args]
    t0 = time.time()
    with open(log / f"{name}.log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(WORK)).returncode
    out = {"command": "ocrtune " + " ".join(args), "seconds": round(time.time() - t0, 1), "exit": rc}
    if rc:
        tail = (log / f"{name}.log").read_text().strip().splitlines()[-1:]
        raise SystemExit(f"error: {name} failed (exit {rc}): {tail[0] if tail else ''}; see {log / (name + '.log')}")
    return out


def newest_checkpoint(output_dir: Path) -> Path:
    return max(output_dir.glob("*/v*-*/checkpoint-*"), key=lambda p: p.stat().st_mtime)


def main(argv=None) -> None:
    a = parse_args(argv)
    model = "tiny" if a.smoke else (a.model or stage1_model())
    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "logs").mkdir(parents=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]),
           **tex_env(str(REPO / a.tex_bundle))}
    rows = f"#{a.eval_rows}" if a.eval_rows else ""
    if a.data_dir:
        data = Path(a.data_dir).resolve()
        train, val = str(data / "print" / "train.parquet"), str(data / "print" / "validation.parquet") + rows
    else:  # --smoke without the real data: the bundled sample
        train, val = "latex-ocr-sample#48", "latex-ocr-sample" + rows
    logs, report = WORK / "logs", {"model": model, "seconds_per_arm": a.seconds, "steps": {}}
    common = ["--model", model, "--dataset", train, "--train_type", "lora", "--lora_rank", "64", "--lora_alpha", "128",
              "--lora_dropout", "0", "--max_time", str(a.seconds), "--save_total_limit", "1", "--report_to", "none",
              "--save_steps", "100000", "--logging_steps", "5", "--min_pixels", str(a.min_pixels),
              "--max_pixels", str(a.max_pixels), "--lr_scheduler_type", "constant",
              "--lr_decay_seconds", str(a.seconds / 2)]
    # warm-up, a constant rate, then a cosine to 0 over the second half of the clock: with --max_steps standing in
    # for "until --max_time", a step schedule would warm up over 5% of 100,000 steps and never leave it
    arms = {"sft": ["sft", *common, "--learning_rate", str(a.sft_lr), "--packing", "true", "--packing_tokens",
                    str(a.packing_tokens), "--dataloader_num_workers", str(a.workers), "--dataset_test_ratio", "0",
                    "--max_steps", "100000", "--warmup_steps", "20", "--predict_with_generate", "false"]}
    for lr in a.grpo_lrs:
        arms["grpo" if len(a.grpo_lrs) == 1 else f"grpo_lr{lr:g}"] = [
            "rlhf", "--rlhf_type", "grpo", *common, "--learning_rate", str(lr), "--reward_funcs", "cdm",
            "--num_generations", str(a.num_generations), "--batch_size", str(a.grpo_batch_size),
            "--max_completion_length", "256", "--beta", str(a.beta), "--max_steps", "100000", "--warmup_steps", "2"]
    report["results"] = {}

    def evaluate(name: str, source: list[str]) -> None:
        result = WORK / f"eval_{name}.jsonl"
        report["steps"][f"eval_{name}"] = run(f"eval_{name}", ["eval", *source, "--val_dataset", val, "--metrics",
                                                               METRICS, "--max_new_tokens", "256", "--infer_batch_size",
                                                               "256", "--result_path", str(result)], env, logs)
        summary = json.loads(result.with_name(result.stem + "_summary.json").read_text())
        report["results"][name] = {k: summary.get(k) for k in ("bleu4", "exact_match", "cdm", "exprate_cdm", "count")}
        write(a.out, report)  # a call cut short still returns what it finished

    evaluate("before", ["--model", model])
    for name, command in arms.items():
        folder = WORK / name
        report["steps"][name] = run(name, [*command, "--output_dir", str(folder)], env, logs)
        lines = [json.loads(x) for x in next(folder.glob("*/v*-*/logging.jsonl")).read_text().splitlines()]
        report["steps"][name]["optimizer_steps"] = max((x.get("step", 0) for x in lines), default=0)
        rewards = [x["reward"] for x in lines if "reward" in x]
        if rewards:
            report["steps"][name]["reward_first_last"] = [rewards[0], rewards[-1]]
        evaluate(name, ["--ckpt_dir", str(newest_checkpoint(folder))])
    r = report["results"]
    report["grpo_minus_sft_exprate_cdm_points"] = {
        n: round(100 * ((r[n]["exprate_cdm"] or 0) - (r["sft"]["exprate_cdm"] or 0)), 2) for n in arms if n != "sft"}
    write(a.out, report)
    print(json.dumps(report["results"], indent=2))
    print(f"GRPO - SFT, ExpRate@CDM points: {report['grpo_minus_sft_exprate_cdm_points']}; wrote {a.out}")


def write(path: str, report: dict) -> None:
    Path(path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
