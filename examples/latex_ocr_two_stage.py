#!/usr/bin/env python3
"""LaTeX OCR in two stages, from scratch, on one GPU - the proof that ocrtune learns OCR on real data.

  stage 1  `ocrtune sft --model small --train_type full --freeze_vit false` on LaTeX_OCR *print*
           (printed formulas, 13.9k rows), with `--augment true` (scale, rotation, margin, blur, noise)
  stage 2  `ocrtune sft --model <stage-1 checkpoint> --train_type lora` on LaTeX_OCR *handwrite*
           (1.2k rows), LoRA on the language model's and the ViT's linear layers
  evals    `ocrtune eval --metrics bleu,edit_distance,exact_match,token_acc`: stage 1 on print
           validation; stage 1 and stage 2 on handwrite validation

Every step is the real ocrtune command line, run as a subprocess; the exact commands go into the
report. Training length is a time budget: a short probe run (`ocrtune sft --max_steps 60`) measures
seconds per step on this machine, and stage 1 gets as many steps as fit in `--stage1_seconds` (its
cosine schedule then ends exactly at the last step). `--stage1_steps` fixes the count instead.

Writes to --report_dir: report.json (settings, commands, timings, metrics, targets, curves' data),
results.md (table, targets and commands as markdown), curves.png (training curves of both stages),
results.png (the metrics as bars), predictions.jsonl (25 predictions per evaluation) and log.txt.

On the GPU machine:   bash examples/latex_ocr_two_stage.sh --data_dir .carry/latex5 --report_dir $OUT
Smoke test on a CPU:  python examples/latex_ocr_two_stage.py --smoke --report_dir /tmp/smoke
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METRICS = "bleu,edit_distance,exact_match,token_acc"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # language model
                "qkv", "proj", "fc1", "fc2"]  # vision tower (attention and MLP of each block)
TARGETS = {"print_bleu4": 0.6, "print_token_acc": 0.9, "handwrite_bleu4_gain": 0.15}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=".carry/latex5", help="folder with print/ and handwrite/ {train,validation}.parquet")
    p.add_argument("--work_dir", default="/tmp/latex_two_stage", help="checkpoints and runs (not part of the report)")
    p.add_argument("--report_dir", default="bench/learning")
    p.add_argument("--model", default="small")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--min_pixels", type=int, default=30000, help="print images (median 240x40) are upscaled to this area")
    p.add_argument("--max_pixels", type=int, default=120000)
    p.add_argument("--workers", type=int, default=12, help="dataloader workers (the H100 machine has 16 cores)")
    p.add_argument("--stage1_seconds", type=float, default=320, help="stage-1 training time budget")
    p.add_argument("--stage1_steps", type=int, default=None, help="fixed stage-1 steps (skips the probe)")
    p.add_argument("--probe_steps", type=int, default=60)
    p.add_argument("--num_evals", type=int, default=5, help="in-training evaluations per stage")
    p.add_argument("--gen_eval_rows", type=int, default=200, help="validation rows generated on during training")
    p.add_argument("--stage2_seconds", type=float, default=70)
    p.add_argument("--stage2_steps", type=int, default=None)
    p.add_argument("--stage2_batch_size", type=int, default=32)
    p.add_argument("--stage2_learning_rate", type=float, default=1e-3)
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--lora_alpha", type=int, default=64)
    p.add_argument("--eval_batch_size", type=int, default=250)
    p.add_argument("--deadline_seconds", type=float, default=565, help="the whole script; stage 2 shrinks to fit")
    p.add_argument("--packing", action="store_true", help="sft --packing true (padding-free rows; positions computed in the workers)")
    p.add_argument("--mixed_precision", default="bf16", help="fp32 master weights + bf16 autocast (accelerate); 'no' = --dtype auto")
    p.add_argument("--train_rows", type=int, default=None, help="use N rows of each train split (smoke tests)")
    p.add_argument("--eval_rows", type=int, default=None, help="use N rows of each validation split (smoke tests)")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few rows and steps: checks the recipe on a CPU")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.batch_size, a.stage1_steps, a.stage2_steps, a.stage2_batch_size = "tiny", 8, 8, 4, 4
        a.train_rows, a.eval_rows, a.gen_eval_rows, a.workers, a.eval_batch_size = 64, 12, 8, 0, 8
        a.num_evals, a.mixed_precision, a.deadline_seconds = 2, "no", 3600
    return a


class Recipe:
    def __init__(self, a):
        self.a = a
        self.t0 = time.time()
        self.data = Path(a.data_dir).resolve()
        self.work = Path(a.work_dir).resolve()
        self.out = Path(a.report_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "log.txt", "a", buffering=1)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                        OCRTUNE_CACHE=str(self.work / "cache"), HF_DATASETS_CACHE=str(self.work / "hf_datasets"),
                        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        if a.mixed_precision != "no":
            self.env["ACCELERATE_MIXED_PRECISION"] = a.mixed_precision
        self.report = {"title": "LaTeX OCR from scratch: small Qwen2-VL, full FT on print, then LoRA on handwriting",
                       "command": " ".join(shlex.quote(x) for x in sys.argv), "settings": vars(a),
                       "environment": {"ACCELERATE_MIXED_PRECISION": self.env.get("ACCELERATE_MIXED_PRECISION", "no")},
                       "commands": {}, "timings_s": {}, "evals": {}, "errors": []}
        self.report["system"] = system_info()
        self.say(f"system: {json.dumps(self.report['system'])}")

    # ------------------------------------------------------------ helpers
    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def elapsed(self) -> float:
        return time.time() - self.t0

    def split(self, subset: str, split: str) -> str:
        path = str(self.data / subset / f"{split}.parquet")
        rows = self.a.train_rows if split == "train" else self.a.eval_rows
        return f"{path}#{rows}" if rows else path

    def ocrtune(self, name: str, args: list[str], timeout: float | None = None, wait: bool = True):
        """Run `ocrtune <args>` (as python -m ocrtune.cli.main, so it needs no install); the printable
        command goes into the report."""
        shown = "ocrtune " + " ".join(shlex.quote(x) for x in args)
        env_prefix = f"ACCELERATE_MIXED_PRECISION={self.env['ACCELERATE_MIXED_PRECISION']} " \
            if args[0] == "sft" and "ACCELERATE_MIXED_PRECISION" in self.env else ""
        self.report["commands"][name] = env_prefix + shown
        self.say(f"$ {env_prefix}{shown}")
        logf = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "ocrtune.cli.main", *args], cwd=str(self.work), env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        lines: list[str] = []

        def pump():
            for line in proc.stdout:
                logf.write(line)
                # progress bars repaint with \r: keep the log readable
                text = line.rstrip("\n").split("\r")[-1]
                if text.strip() and "it/s]" not in text and "s/it]" not in text and "step/s]" not in text:
                    lines.append(text)
                    self.log.write(f"    {name}| {text}\n")
        th = threading.Thread(target=pump, daemon=True)
        th.start()
        job = {"name": name, "proc": proc, "thread": th, "lines": lines, "start": time.time(), "timeout": timeout, "logf": logf}
        return self.wait(job) if wait else job

    def wait(self, job) -> dict:
        proc = job["proc"]
        try:
            rc = proc.wait(timeout=job["timeout"])
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            self.report["errors"].append(f"{job['name']}: killed after {job['timeout']:.0f}s")
        job["thread"].join(timeout=10)
        job["logf"].close()
        secs = round(time.time() - job["start"], 1)
        self.report["timings_s"][job["name"]] = secs
        tail = job["lines"][-15:]
        if rc != 0:
            self.report["errors"].append(f"{job['name']}: exit {rc}: " + " | ".join(tail[-5:]))
            self.say(f"{job['name']} FAILED (exit {rc}) after {secs}s:\n    " + "\n    ".join(tail))
        else:
            self.say(f"{job['name']} done in {secs}s")
        return {"rc": rc, "lines": job["lines"], "seconds": secs}

    def save_report(self) -> None:
        self.report["timings_s"]["total"] = round(self.elapsed(), 1)
        (self.out / "report.json").write_text(json.dumps(self.report, indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------ steps
    def sft_common(self) -> list[str]:
        a = self.a
        dtype = ["--dtype", "float32"] if a.mixed_precision != "no" else []
        return [*dtype, "--gradient_checkpointing", "false", "--dataloader_num_workers", str(a.workers),
                "--min_pixels", str(a.min_pixels), "--max_pixels", str(a.max_pixels), "--augment", "true",
                "--add_output_dir_suffix", "false", "--report_to", "none", "--save_total_limit", "1",
                *(["--packing", "true"] if a.packing else [])]

    def probe(self) -> float:
        """Seconds per stage-1 step on this machine (real data, augmentation, workers, batch size)."""
        a, n = self.a, self.a.probe_steps
        run = self.work / "probe"
        r = self.ocrtune("probe", ["sft", "--model", a.model, "--train_type", "full", "--freeze_vit", "false",
                                   "--dataset", self.split("print", "train"), "--dataset_test_ratio", "0",
                                   "--batch_size", str(a.batch_size), "--learning_rate", str(a.learning_rate),
                                   "--max_steps", str(n), "--logging_steps", str(n // 3), "--eval_steps", str(n),
                                   "--output_dir", str(run), *self.sft_common()], timeout=240)
        recs = read_jsonl(run / "logging.jsonl")
        pts = [(x["step"], x["step"] / x["train_speed(iter/s)"]) for x in recs if x.get("train_speed(iter/s)")]
        if r["rc"] != 0 or len(pts) < 2:
            raise RuntimeError("the probe run failed; see log.txt")
        (s0, t0), (s1, t1) = pts[0], pts[-1]
        sec = (t1 - t0) / (s1 - s0)
        self.report["probe"] = {"steps": n, "seconds_per_step": round(sec, 4), "first_steps_seconds": round(t0, 2),
                                "samples_per_second": round(a.batch_size / sec, 1), "wall_seconds": r["seconds"]}
        self.say(f"probe: {sec:.4f} s/step at batch {a.batch_size} ({a.batch_size / sec:.0f} samples/s); "
                 f"first {s0} steps took {t0:.1f}s")
        return sec

    def stage1(self, steps: int) -> str:
        a = self.a
        run = self.work / "stage1"
        eval_steps = max(1, steps // a.num_evals)
        r = self.ocrtune("stage1_sft", [
            "sft", "--model", a.model, "--train_type", "full", "--freeze_vit", "false",
            "--dataset", self.split("print", "train"),
            "--val_dataset", f"{self.data / 'print' / 'validation.parquet'}#{a.gen_eval_rows}",
            "--batch_size", str(a.batch_size), "--eval_batch_size", str(max(a.gen_eval_rows, 8)),
            "--learning_rate", str(a.learning_rate), "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05",
            "--max_steps", str(steps), "--eval_steps", str(eval_steps), "--logging_steps", str(max(1, min(20, steps // 50))),
            "--predict_with_generate", "true", "--max_new_tokens", "256",
            "--output_dir", str(run), *self.sft_common()], timeout=max(600.0, 3 * a.stage1_seconds))
        self.report["stage1"] = summarize_run(run, r, a.batch_size, self.train_rows("print"))
        if r["rc"] != 0:
            raise RuntimeError("stage 1 failed")
        return last_checkpoint(r["lines"], run)

    def stage2(self, base: str, steps: int) -> str:
        a = self.a
        run = self.work / "stage2"
        r = self.ocrtune("stage2_sft", [
            "sft", "--model", base, "--train_type", "lora", "--lora_rank", str(a.lora_rank), "--lora_alpha", str(a.lora_alpha),
            "--target_modules", *LORA_TARGETS,
            "--dataset", self.split("handwrite", "train"), "--val_dataset", self.split("handwrite", "validation"),
            "--batch_size", str(a.stage2_batch_size), "--eval_batch_size", "100",
            "--learning_rate", str(a.stage2_learning_rate), "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05",
            "--max_steps", str(steps), "--eval_steps", str(max(1, steps // a.num_evals)),
            "--logging_steps", str(max(1, min(10, steps // 50))),
            "--predict_with_generate", "true", "--max_new_tokens", "128",
            "--output_dir", str(run), *self.sft_common()], timeout=max(300.0, 3 * a.stage2_seconds))
        self.report["stage2"] = summarize_run(run, r, a.stage2_batch_size, self.train_rows("handwrite"))
        if r["rc"] != 0:
            raise RuntimeError("stage 2 failed")
        return last_checkpoint(r["lines"], run)

    def train_rows(self, subset: str) -> int:
        import pyarrow.parquet as pq
        n = pq.ParquetFile(self.data / subset / "train.parquet").metadata.num_rows
        return min(n, self.a.train_rows) if self.a.train_rows else n

    def eval_job(self, name: str, ckpt: str, subset: str, max_new_tokens: int, wait: bool = True):
        result = self.work / "eval" / f"{name}.jsonl"
        job = self.ocrtune(name, ["eval", "--ckpt_dir", ckpt, "--val_dataset", self.split(subset, "validation"),
                                  "--metrics", METRICS, "--infer_batch_size", str(self.a.eval_batch_size),
                                  "--max_new_tokens", str(max_new_tokens), "--result_path", str(result)],
                           timeout=240, wait=wait)
        return job

    def collect_eval(self, name: str, r: dict) -> None:
        summary_path = self.work / "eval" / f"{name}_summary.json"
        if r["rc"] == 0 and summary_path.exists():
            s = json.loads(summary_path.read_text())
            self.report["evals"][name] = {k: s[k] for k in ("bleu4", "edit_distance_token", "edit_distance_char", "exact_match",
                                                          "token_acc", "loss", "count", "seconds", "dataset", "ckpt_dir") if k in s}
            rows = read_jsonl(self.work / "eval" / f"{name}.jsonl")
            with open(self.out / "predictions.jsonl", "a") as f:
                for row in rows[:25]:
                    f.write(json.dumps({"eval": name, **{k: row.get(k) for k in ("index", "reference", "prediction", "bleu4",
                                                                                 "edit_distance_token", "exact_match")}},
                                       ensure_ascii=False) + "\n")
            self.say(f"{name}: " + json.dumps({k: v for k, v in self.report["evals"][name].items()
                                              if k not in ("dataset", "ckpt_dir")}))

    def infer_job(self, name: str, ckpt: str, subset: str):
        """`ocrtune infer --image` (one-shot) on the first validation image: the checkpoint loads in infer too."""
        import pyarrow.parquet as pq
        row = pq.read_table(self.data / subset / "validation.parquet").slice(0, 1).to_pylist()[0]
        image = self.work / f"{subset}_validation_0.png"
        image.write_bytes(row["image"]["bytes"])
        self.report.setdefault("infer_one_shot", {})[name] = {"image": f"{subset}/validation.parquet row 0", "reference": row["text"]}
        return self.ocrtune(name, ["infer", "--ckpt_dir", ckpt, "--image", str(image), "--max_new_tokens", "256"],
                            timeout=180, wait=False)

    def collect_infer(self, name: str, job) -> None:
        r = self.wait(job)
        entry = self.report["infer_one_shot"][name]
        entry["exit_code"] = r["rc"]
        entry["output"] = r["lines"][-1] if r["lines"] else None
        self.say(f"{name}: {entry['output']!r} (reference {entry['reference']!r})")

    # ------------------------------------------------------------ the run
    def run(self) -> int:
        a = self.a
        (self.out / "predictions.jsonl").unlink(missing_ok=True)
        try:
            if a.stage1_steps:
                steps1 = a.stage1_steps
            else:
                sec = self.probe()
                # in-training evaluations generate on --gen_eval_rows rows: give each ~8 s of the budget;
                # each epoch restarts the dataloader workers (~1 s; the probe runs inside one epoch)
                per_step = sec + 1.0 * a.batch_size / self.train_rows("print")
                steps1 = max(50, int((a.stage1_seconds - 8 * a.num_evals) / per_step))
            self.report["stage1_planned_steps"] = steps1
            self.save_report()
            ckpt1 = self.stage1(steps1)
            self.report["stage1_checkpoint"] = ckpt1
            self.save_report()

            # stage-1 evaluations run beside each other (the model is small; the GPU has room)
            jobs = [("eval_stage1_print", self.eval_job("eval_stage1_print", ckpt1, "print", 256, wait=False)),
                    ("eval_stage1_handwrite", self.eval_job("eval_stage1_handwrite", ckpt1, "handwrite", 128, wait=False))]
            infer1 = self.infer_job("infer_stage1", ckpt1, "print")
            for name, job in jobs:
                self.collect_eval(name, self.wait(job))
            self.collect_infer("infer_stage1", infer1)
            self.save_report()

            if a.stage2_steps:
                steps2 = a.stage2_steps
            else:
                sec1 = self.report["stage1"].get("seconds_per_step") or self.report.get("probe", {}).get("seconds_per_step", 0.1)
                per_sample = sec1 / a.batch_size
                # handwriting images are ~2x the tokens of print ones; LoRA adds a little
                sec2 = max(0.02, 2.0 * per_sample * a.stage2_batch_size)
                left = a.deadline_seconds - self.elapsed() - 75  # stage-2 start-up, eval, report
                budget = max(20.0, min(a.stage2_seconds, left))
                steps2 = int(min(900, max(60, (budget - 3 * a.num_evals) / sec2)))
                self.report["stage2_plan"] = {"estimated_seconds_per_step": round(sec2, 4), "budget_seconds": round(budget, 1)}
            self.report["stage2_planned_steps"] = steps2
            ckpt2 = self.stage2(ckpt1, steps2)
            self.report["stage2_checkpoint"] = ckpt2
            self.save_report()
            infer2 = self.infer_job("infer_stage2", ckpt2, "handwrite")
            self.collect_eval("eval_stage2_handwrite", self.eval_job("eval_stage2_handwrite", ckpt2, "handwrite", 128))
            self.collect_infer("infer_stage2", infer2)
        except Exception as e:  # keep what was measured
            self.report["errors"].append(f"{type(e).__name__}: {e}")
            self.say(f"stopped: {type(e).__name__}: {e}")
        self.finish()
        return 1 if self.report["errors"] else 0

    def finish(self) -> None:
        ev = self.report["evals"]
        res = {}
        p = ev.get("eval_stage1_print", {})
        h1, h2 = ev.get("eval_stage1_handwrite", {}), ev.get("eval_stage2_handwrite", {})
        if p:
            res["print_bleu4"] = {"value": p.get("bleu4"), "target": TARGETS["print_bleu4"],
                                  "met": (p.get("bleu4") or 0) >= TARGETS["print_bleu4"]}
            res["print_token_acc"] = {"value": p.get("token_acc"), "target": TARGETS["print_token_acc"],
                                      "met": (p.get("token_acc") or 0) >= TARGETS["print_token_acc"]}
        if h1 and h2:
            gain = round((h2.get("bleu4") or 0) - (h1.get("bleu4") or 0), 6)
            res["handwrite_bleu4_gain"] = {"value": gain, "target": TARGETS["handwrite_bleu4_gain"],
                                           "met": gain >= TARGETS["handwrite_bleu4_gain"]}
        self.report["targets"] = res
        self.report["table_markdown"] = results_table(ev)
        self.save_report()
        try:
            plot_curves(self.report, self.out / "curves.png")
            plot_results(ev, self.out / "results.png")
        except Exception as e:
            self.report["errors"].append(f"plots: {type(e).__name__}: {e}")
        self.save_report()
        (self.out / "results.md").write_text(results_markdown(self.report))
        self.say("results:\n" + self.report["table_markdown"])
        self.say("targets: " + json.dumps(res))
        if self.report["errors"]:
            self.say("errors: " + json.dumps(self.report["errors"]))


# ---------------------------------------------------------------- run folders and logs

def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def last_checkpoint(lines: list[str], run: Path) -> str:
    for line in reversed(lines):
        if line.startswith("last_model_checkpoint:"):
            return line.split(":", 1)[1].strip()
    ckpts = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if not ckpts:
        raise RuntimeError(f"no checkpoint in {run}")
    return str(ckpts[-1])


def summarize_run(run: Path, r: dict, batch_size: int, train_rows: int) -> dict:
    recs = read_jsonl(run / "logging.jsonl")
    train = [x for x in recs if "loss" in x]
    evals = [x for x in recs if "eval_loss" in x]
    out = {"run_dir": str(run), "exit_code": r["rc"], "wall_seconds": r["seconds"],
           "log": {"train": [{k: x.get(k) for k in ("step", "loss", "token_acc", "learning_rate", "grad_norm")} for x in train],
                   "eval": [{k: v for k, v in x.items() if k.startswith("eval_") or k == "step"} for x in evals]}}
    if train:
        last = train[-1]
        steps = last["step"]
        train_s = steps / last["train_speed(iter/s)"] if last.get("train_speed(iter/s)") else None
        out.update(steps=steps, batch_size=batch_size, samples_seen=steps * batch_size,
                   epochs=round(steps * batch_size / max(train_rows, 1), 2), train_rows=train_rows,
                   train_seconds=round(train_s, 1) if train_s else None,
                   seconds_per_step=round(train_s / steps, 4) if train_s else None,
                   final_train_loss=last.get("loss"), final_train_token_acc=last.get("token_acc"),
                   peak_memory_gib=max((x.get("memory(GiB)") or 0) for x in train))
    if evals:
        out["final_eval"] = {k: v for k, v in evals[-1].items() if k.startswith("eval_")}
    return out


def system_info() -> dict:
    info = {"python": sys.version.split()[0]}
    try:
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.cuda.is_available())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as e:  # noqa: BLE001
        info["error"] = str(e)
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        pass
    return info


# ---------------------------------------------------------------- table and plots

ROWS = [("eval_stage1_print", "stage 1 (full FT, print)", "print validation"),
        ("eval_stage1_handwrite", "stage 1 (full FT, print)", "handwrite validation"),
        ("eval_stage2_handwrite", "stage 2 (+ LoRA, handwrite)", "handwrite validation")]


def results_table(ev: dict) -> str:
    lines = ["| model | data | rows | BLEU-4 | edit distance (token) | edit distance (char) | exact match | token accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for key, model, data in ROWS:
        e = ev.get(key)
        if not e:
            lines.append(f"| {model} | {data} | - | - | - | - | - | - |")
            continue
        f = lambda k: f"{e[k]:.4f}" if isinstance(e.get(k), (int, float)) else "-"  # noqa: E731
        lines.append(f"| {model} | {data} | {e.get('count', '-')} | {f('bleu4')} | {f('edit_distance_token')} | "
                     f"{f('edit_distance_char')} | {f('exact_match')} | {f('token_acc')} |")
    return "\n".join(lines)


def results_markdown(r: dict) -> str:
    """The report as markdown: table, targets, run facts and the exact commands."""
    out = ["## Results on LaTeX_OCR", "", r.get("table_markdown", ""), ""]
    for k, t in (r.get("targets") or {}).items():
        out.append(f"- {k}: {t['value']} (target {t['target']}: {'met' if t['met'] else 'NOT met'})")
    s1, s2 = r.get("stage1", {}), r.get("stage2", {})
    for name, s in (("stage 1", s1), ("stage 2", s2)):
        if s.get("steps"):
            out.append(f"- {name}: {s['steps']} steps x batch {s['batch_size']} = {s['samples_seen']} samples "
                       f"({s['epochs']} epochs of {s['train_rows']} rows) in {s.get('train_seconds')} s of training "
                       f"({s.get('seconds_per_step')} s/step), peak memory {s.get('peak_memory_gib')} GiB")
    sysinfo = r.get("system", {})
    out += [f"- machine: {sysinfo.get('gpu', 'cpu')}, torch {sysinfo.get('torch')}, transformers {sysinfo.get('transformers')}; "
            f"whole run {r.get('timings_s', {}).get('total')} s", "", "Commands (in the order run):", "", "```bash"]
    out += [r["commands"][k] for k in r.get("commands", {})]
    out += ["```", ""]
    if r.get("errors"):
        out += ["Errors:", ""] + [f"- {e}" for e in r["errors"]] + [""]
    return "\n".join(out)


def plot_curves(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [(k, t) for k, t in (("stage1", "stage 1: full FT on print"), ("stage2", "stage 2: LoRA on handwrite"))
              if report.get(k, {}).get("log")]
    if not stages:
        return
    fig, axes = plt.subplots(len(stages), 3, figsize=(16, 4.5 * len(stages)), squeeze=False)
    for row, (key, title) in zip(axes, stages):
        log = report[key]["log"]
        tr, ev = log["train"], log["eval"]
        ax = row[0]
        ax.plot([x["step"] for x in tr], [x["loss"] for x in tr], label="train loss", alpha=0.8)
        ax.plot([x["step"] for x in ev], [x.get("eval_loss") for x in ev], "o-", label="eval loss")
        ax.set_yscale("log")
        ax.set_title(f"{title}: loss")
        ax = row[1]
        ax.plot([x["step"] for x in tr], [x["token_acc"] for x in tr], label="train token acc", alpha=0.8)
        ax.plot([x["step"] for x in ev], [x.get("eval_acc") for x in ev], "o-", label="eval token acc")
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}: token accuracy (teacher-forced)")
        ax = row[2]
        for k, lab in (("eval_bleu4", "BLEU-4"), ("eval_exact_match", "exact match"), ("eval_edit_distance_token", "edit distance (token)")):
            pts = [(x["step"], x[k]) for x in ev if isinstance(x.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), "o-", label=lab)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}: generation on validation")
        for ax in row:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_results(ev: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("bleu4", "BLEU-4"), ("edit_distance_token", "edit dist (token)"), ("exact_match", "exact match"), ("token_acc", "token acc")]
    present = [(k, m, d) for k, m, d in ROWS if ev.get(k)]
    if not present:
        return
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(present)
    for i, (k, m, d) in enumerate(present):
        vals = [ev[k].get(mk) or 0 for mk, _ in keys]
        bars = ax.bar([j + i * width for j in range(len(keys))], vals, width, label=f"{m} on {d}")
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks([j + width * (len(present) - 1) / 2 for j in range(len(keys))], [lab for _, lab in keys])
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8)
    ax.set_title("LaTeX_OCR validation metrics")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    return Recipe(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
