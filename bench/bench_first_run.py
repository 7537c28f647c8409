#!/usr/bin/env python3
"""A newcomer's first minutes on a CPU machine, timed: the bundled reader on a printed formula, `ocrtune sft` with no
flags (the reader fine-tuned with LoRA on the package's handwriting rows, evaluated with generation), and the
handwriting validation rows read before and after. Every step is the real command line, run in a fresh folder.

    python bench/bench_first_run.py --out bench/results/first_run_cpu.json

Reports: handwriting BLEU-4 before (`ocrtune eval --model ocrtune-reader`) and after (the run's last eval_bleu4, on
the same 16 rows), the sft command's wall time, and seconds a formula for `ocrtune infer` (one image a call, the model
loaded once: the interactive/serve case) and for the whole command (load included).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ocrtune(args: list[str], cwd: Path) -> tuple[float, str]:
    t = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "ocrtune", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode:
        raise SystemExit(f"error: ocrtune {' '.join(args)} failed: {res.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t, res.stdout


def infer_seconds_per_formula(rows: int) -> dict:
    """The reader loaded once, then the package's print validation rows read one at a time (greedy)."""
    sys.path.insert(0, str(REPO))
    from ocrtune.data.loading import load_dataset
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.load import load_for_inference
    engine, _ = load_for_inference(InferArgs())
    ds = load_dataset("latex-ocr-sample-print", split="validation")
    data = [ds[i] for i in range(min(rows, len(ds)))]
    engine.generate(data[:1], 256)  # first call: thread pools, allocator
    t = time.perf_counter()
    for r in data:
        engine.generate([r], 256)
    return {"rows": len(data), "seconds_per_formula": round((time.perf_counter() - t) / len(data), 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    report = {"command": "python bench/bench_first_run.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}}
    import torch
    report["machine"]["torch"] = torch.__version__
    report["machine"]["torch_threads"] = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        img = REPO / "examples" / "formula.png"
        secs, out = ocrtune(["infer", "--image", str(img)], work)  # also restores the reader into the cache once
        secs, out = ocrtune(["infer", "--image", str(img)], work)
        report["infer_command"] = {"seconds": round(secs, 2), "answer": out.strip()}
        secs, _ = ocrtune(["eval", "--model", "ocrtune-reader", "--val_dataset", "latex-ocr-sample-handwrite",
                           "--metrics", "bleu,exact_match", "--max_new_tokens", "256", "--result_path",
                           str(work / "before.jsonl")], work)
        before = json.loads((work / "before_summary.json").read_text())
        report["handwrite_before"] = {k: before[k] for k in ("bleu4", "exact_match", "count")}
        secs, out = ocrtune(["sft"], work)
        run = next((work / "output" / "ocrtune-reader").glob("v0-*"))
        log = [json.loads(line) for line in (run / "logging.jsonl").read_text().splitlines()]
        last = [r for r in log if "eval_bleu4" in r][-1]
        report["sft"] = {"command": "ocrtune sft", "seconds": round(secs, 1), "steps": last["step"],
                         "args": {k: json.loads((run / "args.json").read_text())[k] for k in
                                  ("model", "dataset", "lora_rank", "lora_alpha", "target_modules", "batch_size",
                                   "num_train_epochs", "learning_rate", "predict_with_generate")}}
        report["handwrite_after"] = {"bleu4": last["eval_bleu4"], "exact_match": last.get("eval_exact_match"),
                                     "count": report["handwrite_before"]["count"]}
        report["handwrite_bleu4_gain"] = round(last["eval_bleu4"] - before["bleu4"], 4)
    report["infer_loaded"] = infer_seconds_per_formula(24)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
