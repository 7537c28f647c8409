#!/usr/bin/env python3
"""LaTeX OCR in two stages, from scratch, on one GPU - the proof that ocrtune learns OCR on real data.

  stage 1  `ocrtune sft --model small --train_type full --freeze_vit false` on LaTeX_OCR *print*
           (printed formulas, 13.9k rows), with `--augment true` (scale, rotation, margin, blur, noise)
  stage 2  `ocrtune sft --model <stage-1 checkpoint> --train_type lora` on LaTeX_OCR *handwrite*
           (1.2k rows), LoRA on the language model's and the ViT's linear layers
  evals    `ocrtune eval --metrics bleu,edit_distance,exact_match,token_acc`: stage 1 on print
           validation; stage 1 and stage 2 on handwrite validation

Every step is the real ocrtune command line, run as a subprocess; the exact commands go into the
report. Defaults: fp32 master weights + bf16 autocast (ACCELERATE_MIXED_PRECISION=bf16, --dtype
float32), --packing true (--no_packing turns it off), images scaled to 100352..200704 pixels
(128..256 visual tokens: a ~240x40 print formula would get only ~45 at 30000 pixels).

Phases (--phase). One device call may run 10 minutes, so the run is split into two calls made back to
back on the same machine; the stage-1 checkpoint waits in --work_dir (default .work/latex_two_stage in
the repository, which git ignores, so it stays on the machine between the two calls):
  stage1  probe + stage-1 training. Writes a partial report to --report_dir (report.json with settings,
          commands, timings, the probe, stage 1's training log and in-training evals; results.md;
          log.txt; curves.png) and keeps its state in <work_dir>/stage1_state.json.
  rest    finds that stage-1 run (its last complete checkpoint; exits with a one-line error if there is
          none), evaluates it on print and handwrite validation (side by side) plus a one-shot infer,
          runs stage 2 and its eval, and writes the FULL report with the stage-1 phase merged in: both
          stages' metrics and curves, every command in the order run, both calls' log.txt.
  all     (default) both in one call, as before; stage 1 then gets only what fits beside the rest.

Time budget, per phase: --deadline_seconds (stage1 560, rest 540, all 565 by default) counts from the
start of the .sh wrapper (its wheel install included). A probe (`ocrtune sft --max_steps 25`) measures
seconds per stage-1 step on this machine from its steady part (steps >= 10, start-up left out); stage 1
gets as many steps as --stage1_seconds of training allows, fewer if start-up, in-training evals and the
save would not fit the deadline (its cosine schedule then ends exactly at the last step).
`--stage1_steps` fixes the count instead (no probe). Stage 2 gets --stage2_seconds of training, shrunk
to fit the deadline; `--stage2_steps` fixes it.

Writes to --report_dir: report.json (settings, commands, timings, metrics, targets, curves' data),
results.md (table, targets and commands as markdown), curves.png (training curves of both stages),
results.png (the metrics as bars), predictions.jsonl (25 predictions per evaluation) and log.txt.

On the GPU machine, two calls back to back (same --data_dir and --work_dir):
  bash examples/latex_ocr_two_stage.sh --phase stage1 --data_dir .carry/latex5 --report_dir $OUT
  bash examples/latex_ocr_two_stage.sh --phase rest --data_dir .carry/latex5 --report_dir $OUT
or all in one call (shorter stage 1):
  bash examples/latex_ocr_two_stage.sh --data_dir .carry/latex5 --report_dir $OUT
Smoke test on a CPU (tiny model, a few rows and steps):
  python examples/latex_ocr_two_stage.py --smoke --phase stage1 --report_dir /tmp/s1 --work_dir /tmp/w
  python examples/latex_ocr_two_stage.py --smoke --phase rest --report_dir /tmp/s2 --work_dir /tmp/w
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
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
DEADLINES = {"all": 565.0, "stage1": 560.0, "rest": 540.0}  # seconds per device call (limit: 600)
STATE_FILE = "stage1_state.json"  # what phase stage1 leaves in --work_dir for phase rest
T0_ENV = "LATEX_OCR_T0"  # the .sh wrapper's start time (epoch seconds): the deadline counts from it
# Time estimates (seconds) for planning; measured on one H100 in run 1 (bench/learning/log.txt)
REST_RESERVE = 200.0  # phase all: stage-1 evals (~65) + a short stage 2 (~90) + final eval (~30) + margin
STAGE2_RESERVE = 75.0  # stage-2 start-up and save (~25), final eval + infer (~30), report, margin
STAGE2_PER_SAMPLE = 2.0  # a handwriting sample (LoRA) costs ~2x a print sample of stage 1 (run 1: ~0.27 vs 0.14 s/32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Phases (--phase)"):])
    p.add_argument("--phase", choices=("all", "stage1", "rest"), default="all",
                   help="stage1: probe + stage 1 only; rest: evals, stage 2, full report (after stage1); all: both")
    p.add_argument("--data_dir", default=".carry/latex5", help="folder with print/ and handwrite/ {train,validation}.parquet")
    p.add_argument("--work_dir", default=None,
                   help="checkpoints and runs, not part of the report (default: <repo>/.work/latex_two_stage, git-ignored)")
    p.add_argument("--report_dir", default="bench/learning")
    p.add_argument("--model", default="small")
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--min_pixels", type=int, default=128 * 28 * 28,
                   help="print images (median 240x40) are upscaled to this area: 100352 = 128 visual tokens")
    p.add_argument("--max_pixels", type=int, default=256 * 28 * 28)
    p.add_argument("--workers", type=int, default=12, help="dataloader workers (the H100 machine has 16 cores)")
    p.add_argument("--stage1_seconds", type=float, default=400,
                   help="stage-1 training budget (steps x s/step; start-up and in-training evals come on top)")
    p.add_argument("--stage1_steps", type=int, default=None, help="fixed stage-1 steps (skips the probe)")
    p.add_argument("--probe_steps", type=int, default=25, help="probe run length; s/step is taken from steps >= 10")
    p.add_argument("--num_evals", type=int, default=4, help="in-training evaluations per stage")
    p.add_argument("--gen_eval_rows", type=int, default=100, help="validation rows generated on during stage-1 training")
    p.add_argument("--stage2_seconds", type=float, default=180, help="stage-2 training budget (shrunk to fit the deadline)")
    p.add_argument("--stage2_steps", type=int, default=None)
    p.add_argument("--stage2_batch_size", type=int, default=32)
    p.add_argument("--stage2_learning_rate", type=float, default=1e-3)
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--lora_alpha", type=int, default=64)
    p.add_argument("--eval_batch_size", type=int, default=250)
    p.add_argument("--deadline_seconds", type=float, default=None,
                   help=f"this phase's time limit, from the wrapper's start (default {DEADLINES})")
    p.add_argument("--packing", dest="packing", action="store_true", default=True,
                   help="sft --packing true (padding-free rows; positions computed in the workers); the default")
    p.add_argument("--no_augment", action="store_true", help="train without image augmentation (sft --augment false)")
    p.add_argument("--no_packing", dest="packing", action="store_false", help="padded batches instead of packing")
    p.add_argument("--mixed_precision", default="bf16", help="fp32 master weights + bf16 autocast (accelerate); 'no' = --dtype auto")
    p.add_argument("--train_rows", type=int, default=None, help="use N rows of each train split (smoke tests)")
    p.add_argument("--eval_rows", type=int, default=None, help="use N rows of each validation split (smoke tests)")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few rows and steps: checks the recipe on a CPU")
    a = p.parse_args(argv)
    a.work_dir = str(Path(a.work_dir).resolve() if a.work_dir else REPO / ".work" / "latex_two_stage")
    if a.deadline_seconds is None:
        a.deadline_seconds = DEADLINES[a.phase]
    a.max_new_tokens_cap = None
    if a.smoke:
        a.model, a.batch_size, a.stage1_steps, a.stage2_steps, a.stage2_batch_size = "tiny", 8, 8, 4, 4
        a.train_rows, a.eval_rows = a.train_rows or 64, a.eval_rows or 12
        a.gen_eval_rows, a.workers, a.eval_batch_size = 8, 0, 8
        a.num_evals, a.mixed_precision, a.deadline_seconds, a.probe_steps = 2, "no", 3600, 12
        a.min_pixels, a.max_pixels, a.max_new_tokens_cap = 30000, 60000, 32  # the CPU has 2 cores
    return a


class Stage1Missing(Exception):
    pass


def find_stage1(work: Path) -> tuple[Path, dict | None]:
    """The stage-1 run that phase stage1 left in `work`: (its last complete checkpoint, its saved state)."""
    state_path = work / STATE_FILE
    state = None
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            state = None
    ckpts = complete_checkpoints(work / "stage1")
    if not ckpts:
        raise Stage1Missing(f"no finished stage-1 run in {work} (no complete checkpoint under stage1/); "
                            f"run --phase stage1 with the same --work_dir first")
    return ckpts[-1], state


class Recipe:
    def __init__(self, a, stage1_found: tuple[Path, dict | None] | None = None):
        self.a = a
        self.t0 = time.time()
        try:  # count from the wrapper's start (its wheel install), if it says when that was
            t0 = float(os.environ.get(T0_ENV, ""))
            if 0 <= self.t0 - t0 < 900:
                self.t0 = t0
        except ValueError:
            pass
        self.stage1_found = stage1_found
        self.data = Path(a.data_dir).resolve()
        self.work = Path(a.work_dir).resolve()
        self.out = Path(a.report_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.clean()
        self.log = open(self.out / "log.txt", "w", buffering=1)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                        OCRTUNE_CACHE=str(self.work / "cache"), HF_DATASETS_CACHE=str(self.work / "hf_datasets"),
                        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                        PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        self.env.pop(T0_ENV, None)
        if a.mixed_precision != "no":
            self.env["ACCELERATE_MIXED_PRECISION"] = a.mixed_precision
        command = " ".join(shlex.quote(x) for x in sys.argv)
        self.report = {"title": "LaTeX OCR from scratch: small Qwen2-VL, full FT on print, then LoRA on handwriting",
                       "phase": a.phase, "command": command, "settings": vars(a),
                       "environment": {"ACCELERATE_MIXED_PRECISION": self.env.get("ACCELERATE_MIXED_PRECISION", "no")},
                       "commands": {}, "timings_s": {}, "evals": {}, "errors": [], "warnings": []}
        self.report["system"] = system_info()
        self.report["phases"] = {a.phase: {"command": command, "deadline_s": a.deadline_seconds, "report_dir": str(self.out),
                                           "system": self.report["system"]}}
        if a.phase == "rest":
            self.adopt_stage1()
        self.say(f"phase {a.phase} (deadline {a.deadline_seconds:.0f} s); work_dir {self.work}")
        self.say(f"system: {json.dumps(self.report['system'])}")

    def clean(self) -> None:
        """Remove what this phase writes anew (an ocrtune run folder that exists gets appended to)."""
        names = ["stage2", "eval"] if self.a.phase == "rest" else ["probe", "stage1", "stage2", "eval", STATE_FILE]
        for name in names:
            path = self.work / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        for name in ("predictions.jsonl", "results.png"):  # from an earlier run into this report_dir
            (self.out / name).unlink(missing_ok=True)

    def adopt_stage1(self) -> None:
        """Phase rest: merge the stage-1 phase's report (settings, commands, timings, logs) into this one."""
        ckpt, state = self.stage1_found
        r = self.report
        s = (state or {}).get("report", {})
        if (state or {}).get("log"):
            self.log.write(f"==== phase stage1 (earlier call; its report_dir: {s.get('phases', {}).get('stage1', {}).get('report_dir')}) ====\n")
            self.log.write(state["log"].rstrip("\n") + "\n")
            self.log.write("==== phase rest ====\n")
        if not state:
            r["warnings"].append(f"no {STATE_FILE} in {self.work}: the stage-1 call's commands, probe and timings are unknown")
        for k in ("probe", "stage1_plan", "stage1_planned_steps", "stage1"):
            if k in s:
                r[k] = s[k]
        if "stage1" not in r:
            r["stage1"] = summarize_run(ckpt.parent, {"rc": None, "seconds": None}, self.a.batch_size, self.train_rows("print"))
        r["stage1_checkpoint"] = str(ckpt)
        r["commands"] = dict(s.get("commands", {}))  # the stage-1 call's commands come first
        t1 = dict(s.get("timings_s", {}))
        r["timings_s"] = {k: v for k, v in t1.items() if k != "total"}
        r["errors"] = [f"phase stage1: {e}" for e in s.get("errors", [])]
        r["warnings"] = [f"phase stage1: {w}" for w in s.get("warnings", [])] + r["warnings"]
        if "stage1" in s.get("phases", {}):
            r["phases"] = {"stage1": {**s["phases"]["stage1"], "settings": s.get("settings")}, **r["phases"]}
        step = read_json(ckpt / "trainer_state.json").get("global_step")
        planned = s.get("stage1_planned_steps")
        if planned and step is not None and step < planned:
            r["warnings"].append(f"stage 1 stopped at step {step} of {planned}: evaluating {ckpt.name}")
        settings1 = s.get("settings") or {}
        for k in ("model", "data_dir", "batch_size", "min_pixels", "max_pixels", "packing", "mixed_precision", "smoke"):
            if k not in settings1:
                continue
            v1, v = settings1[k], getattr(self.a, k)
            same = Path(v1).resolve() == self.data if k == "data_dir" else v1 == v
            if not same:
                r["warnings"].append(f"--{k} differs from the stage-1 call's ({v1!r} there, {v!r} here)")

    # ------------------------------------------------------------ helpers
    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def elapsed(self) -> float:
        return time.time() - self.t0

    def left(self, reserve: float = 0.0, floor: float = 30.0) -> float:
        """Seconds to the deadline less `reserve`, at least `floor` (a subprocess timeout)."""
        return max(floor, self.a.deadline_seconds - self.elapsed() - reserve)

    def mnt(self, n: int) -> str:
        return str(min(n, self.a.max_new_tokens_cap) if self.a.max_new_tokens_cap else n)

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
        self.say(f"$ {env_prefix}{shown}" + (f"   [timeout {timeout:.0f}s]" if timeout else ""))
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
        timeout = job["timeout"]
        if timeout is not None:  # counted from the job's start, also when waited on later
            timeout = max(1.0, timeout - (time.time() - job["start"]))
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            self.report["errors"].append(f"{job['name']}: killed after {job['timeout']:.0f}s (deadline)")
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
        t = dict(self.report["timings_s"], **{f"phase_{self.a.phase}": round(self.elapsed(), 1)})
        t.pop("total", None)  # steps first, then the phases (device calls) and their sum
        steps = {k: v for k, v in t.items() if not k.startswith("phase_")}
        phases = {k: v for k, v in t.items() if k.startswith("phase_")}
        total = round(sum(v for v in phases.values() if isinstance(v, (int, float))), 1)
        self.report["timings_s"] = {**steps, **phases, "total": total}
        self.report["phases"][self.a.phase]["seconds"] = phases[f"phase_{self.a.phase}"]
        (self.out / "report.json").write_text(json.dumps(self.report, indent=2, ensure_ascii=False) + "\n")

    # ------------------------------------------------------------ steps
    def sft_common(self) -> list[str]:
        a = self.a
        dtype = ["--dtype", "float32"] if a.mixed_precision != "no" else []
        return [*dtype, "--gradient_checkpointing", "false", "--dataloader_num_workers", str(a.workers),
                "--min_pixels", str(a.min_pixels), "--max_pixels", str(a.max_pixels), "--augment", "false" if a.no_augment else "true",
                "--add_output_dir_suffix", "false", "--report_to", "none", "--save_total_limit", "1",
                *(["--packing", "true"] if a.packing else [])]

    def probe(self) -> dict:
        """Seconds per stage-1 step on this machine (real data, augmentation, workers, batch size), from the
        probe's steady part: logged steps >= 10 (start-up, first batches and warm-up left out)."""
        a, n = self.a, self.a.probe_steps
        run = self.work / "probe"
        log_every = max(1, n // 5)
        r = self.ocrtune("probe", ["sft", "--model", a.model, "--train_type", "full", "--freeze_vit", "false",
                                   "--dataset", self.split("print", "train"), "--dataset_test_ratio", "0",
                                   "--batch_size", str(a.batch_size), "--learning_rate", str(a.learning_rate),
                                   "--max_steps", str(n), "--logging_steps", str(log_every), "--eval_steps", str(n),
                                   "--output_dir", str(run), *self.sft_common()],
                         timeout=min(240.0, self.left(reserve=10)))
        recs = read_jsonl(run / "logging.jsonl")
        # train_speed is steps / seconds since the training loop began: step / speed = that step's time
        pts = [(x["step"], x["step"] / x["train_speed(iter/s)"]) for x in recs if x.get("train_speed(iter/s)")]
        if r["rc"] != 0 or len(pts) < 2:
            raise RuntimeError("the probe run failed; see log.txt")
        for ckpt in run.glob("checkpoint-*"):  # only its log is needed; leave the disk to stage 1
            shutil.rmtree(ckpt, ignore_errors=True)
        steady = [p for p in pts if p[0] >= min(10, n // 2)]
        (s0, t0) = steady[0] if len(steady) >= 2 else pts[0]
        (s1, t1) = pts[-1]
        sec = (t1 - t0) / (s1 - s0)
        warm = max(0.0, t0 - s0 * sec)  # what the first s0 steps took beyond the steady pace
        overhead = max(0.0, r["seconds"] - t1)  # process start, model build, data load and checks, save
        self.report["probe"] = {"steps": n, "seconds_per_step": round(sec, 4), "steady_from_step": s0,
                                "first_steps_seconds": round(t0, 2), "warmup_extra_seconds": round(warm, 1),
                                "startup_and_save_seconds": round(overhead, 1),
                                "samples_per_second": round(a.batch_size / sec, 1), "wall_seconds": r["seconds"]}
        self.say(f"probe: {sec:.4f} s/step at batch {a.batch_size} ({a.batch_size / sec:.0f} samples/s) over steps "
                 f"{s0}-{s1}; first {s0} steps took {t0:.1f}s; start-up + save {overhead:.1f}s")
        return self.report["probe"]

    def plan_stage1(self) -> int:
        """Stage-1 steps: --stage1_steps, or what --stage1_seconds buys at the probe's pace, fewer if the
        whole of stage 1 (start-up, warm-up, in-training evals, save) would pass this phase's deadline."""
        a = self.a
        if a.stage1_steps and not a.smoke:
            return a.stage1_steps
        p = self.probe()  # (the smoke test probes too, to check this path, but keeps its fixed steps)
        # each epoch restarts the dataloader workers (~1 s); the probe runs inside one epoch
        per_step = p["seconds_per_step"] + 1.0 * a.batch_size / self.train_rows("print")
        eval_s = 2.0 + 0.05 * a.gen_eval_rows  # one in-training eval: loss + greedy generation on gen_eval_rows rows
        fixed = p["startup_and_save_seconds"] + p["warmup_extra_seconds"] + a.num_evals * eval_s + 10.0  # 10: margin
        reserve = REST_RESERVE if a.phase == "all" else 0.0
        fit = a.deadline_seconds - self.elapsed() - fixed - reserve
        budget = min(a.stage1_seconds, fit)
        steps = round_steps(max(50, int(budget / per_step)), a.num_evals)
        self.report["stage1_plan"] = {"seconds_per_step": round(per_step, 4), "train_budget_seconds": round(budget, 1),
                                      "fits_deadline_seconds": round(fit, 1), "fixed_seconds": round(fixed, 1),
                                      "eval_seconds_each": eval_s, "rest_reserve_seconds": reserve,
                                      "shrunk_to_fit": fit < a.stage1_seconds,
                                      "expected_end_s": round(self.elapsed() + fixed - 10 + steps * per_step, 1)}
        self.say(f"stage-1 plan: {steps} steps x {per_step:.3f}s = {steps * per_step:.0f}s of training "
                 f"(budget {a.stage1_seconds:.0f}s, {fit:.0f}s fit the {a.deadline_seconds:.0f}s deadline; "
                 f"expected end at ~{self.report['stage1_plan']['expected_end_s']:.0f}s)"
                 + (f"; the smoke test keeps --stage1_steps {a.stage1_steps}" if a.stage1_steps else ""))
        return a.stage1_steps or steps

    def stage1(self, steps: int) -> Path:
        a = self.a
        run = self.work / "stage1"
        r = self.ocrtune("stage1_sft", [
            "sft", "--model", a.model, "--train_type", "full", "--freeze_vit", "false",
            "--dataset", self.split("print", "train"),
            "--val_dataset", f"{self.data / 'print' / 'validation.parquet'}#{a.gen_eval_rows}",
            "--batch_size", str(a.batch_size), "--eval_batch_size", str(max(a.gen_eval_rows, 8)),
            "--learning_rate", str(a.learning_rate), "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05",
            "--max_steps", str(steps), "--eval_steps", str(eval_every(steps, a.num_evals)),
            "--logging_steps", str(max(1, min(20, steps // 50))),
            "--predict_with_generate", "true", "--max_new_tokens", self.mnt(256),
            "--output_dir", str(run), *self.sft_common()], timeout=self.left(reserve=5 if a.phase == "stage1" else 100))
        self.report["stage1"] = summarize_run(run, r, a.batch_size, self.train_rows("print"))
        return self.checkpoint_of(r, run, "stage 1")

    def stage2(self, base: Path, steps: int) -> Path:
        a = self.a
        run = self.work / "stage2"
        r = self.ocrtune("stage2_sft", [
            "sft", "--model", str(base), "--train_type", "lora", "--lora_rank", str(a.lora_rank), "--lora_alpha", str(a.lora_alpha),
            "--target_modules", *LORA_TARGETS,
            "--dataset", self.split("handwrite", "train"), "--val_dataset", self.split("handwrite", "validation"),
            "--batch_size", str(a.stage2_batch_size), "--eval_batch_size", "100",
            "--learning_rate", str(a.stage2_learning_rate), "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05",
            "--max_steps", str(steps), "--eval_steps", str(eval_every(steps, a.num_evals)),
            "--logging_steps", str(max(1, min(10, steps // 50))),
            "--predict_with_generate", "true", "--max_new_tokens", self.mnt(128),
            "--output_dir", str(run), *self.sft_common()], timeout=self.left(reserve=40))
        self.report["stage2"] = summarize_run(run, r, a.stage2_batch_size, self.train_rows("handwrite"))
        return self.checkpoint_of(r, run, "stage 2")

    def checkpoint_of(self, r: dict, run: Path, what: str) -> Path:
        """The run's last complete checkpoint; a run that failed (or was stopped at the deadline) after
        saving one still gets evaluated, with the error in the report."""
        ckpts = complete_checkpoints(run)
        if not ckpts:
            raise RuntimeError(f"{what} failed with no checkpoint")
        if r["rc"] != 0:
            self.report["warnings"].append(f"{what} did not finish: using {ckpts[-1].name}")
        return ckpts[-1]

    def train_rows(self, subset: str) -> int:
        import pyarrow.parquet as pq
        n = pq.ParquetFile(self.data / subset / "train.parquet").metadata.num_rows
        return min(n, self.a.train_rows) if self.a.train_rows else n

    def eval_job(self, name: str, ckpt: Path, subset: str, max_new_tokens: int, wait: bool = True, timeout: float = 240.0):
        result = self.work / "eval" / f"{name}.jsonl"
        job = self.ocrtune(name, ["eval", "--ckpt_dir", str(ckpt), "--val_dataset", self.split(subset, "validation"),
                                  "--metrics", METRICS, "--infer_batch_size", str(self.a.eval_batch_size),
                                  "--max_new_tokens", self.mnt(max_new_tokens), "--result_path", str(result)],
                           timeout=timeout, wait=wait)
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

    def infer_job(self, name: str, ckpt: Path, subset: str, timeout: float = 180.0):
        """`ocrtune infer --image` (one-shot) on the first validation image: the checkpoint loads in infer too."""
        import pyarrow.parquet as pq
        row = pq.read_table(self.data / subset / "validation.parquet").slice(0, 1).to_pylist()[0]
        image = self.work / f"{subset}_validation_0.png"
        image.write_bytes(row["image"]["bytes"])
        self.report.setdefault("infer_one_shot", {})[name] = {"image": f"{subset}/validation.parquet row 0", "reference": row["text"]}
        return self.ocrtune(name, ["infer", "--ckpt_dir", str(ckpt), "--image", str(image), "--max_new_tokens", self.mnt(256)],
                            timeout=timeout, wait=False)

    def collect_infer(self, name: str, job) -> None:
        r = self.wait(job)
        entry = self.report["infer_one_shot"][name]
        entry["exit_code"] = r["rc"]
        entry["output"] = r["lines"][-1] if r["lines"] else None
        self.say(f"{name}: {entry['output']!r} (reference {entry['reference']!r})")

    def plan_stage2(self) -> int:
        """Stage-2 steps: --stage2_steps, or what --stage2_seconds of training buys, shrunk to fit the deadline."""
        a = self.a
        if a.stage2_steps:
            return a.stage2_steps
        sec1 = (self.report.get("probe", {}).get("seconds_per_step") or self.report["stage1"].get("seconds_per_step") or 0.6)
        sec2 = max(0.02, STAGE2_PER_SAMPLE * sec1 / a.batch_size * a.stage2_batch_size)
        eval_s = 4.0  # one in-training eval: loss + greedy generation on 100 handwriting rows
        fit = a.deadline_seconds - self.elapsed() - STAGE2_RESERVE - a.num_evals * eval_s
        budget = max(20.0, min(a.stage2_seconds, fit))
        steps2 = round_steps(int(min(3000, max(60, budget / sec2))), a.num_evals)
        self.report["stage2_plan"] = {"estimated_seconds_per_step": round(sec2, 4), "budget_seconds": round(budget, 1),
                                      "fits_deadline_seconds": round(fit, 1), "shrunk_to_fit": fit < a.stage2_seconds}
        self.say(f"stage-2 plan: {steps2} steps x ~{sec2:.3f}s (budget {budget:.0f}s of {a.stage2_seconds:.0f}s)")
        return steps2

    # ------------------------------------------------------------ the run
    def run(self) -> int:
        a = self.a
        try:
            if a.phase == "rest":
                ckpt1 = Path(self.report["stage1_checkpoint"])
                self.say(f"stage 1 from the earlier call: {ckpt1}")
            else:
                steps1 = self.plan_stage1()
                self.report["stage1_planned_steps"] = steps1
                self.save_report()
                self.save_state()  # again at the end; this one serves phase rest if the call is cut off mid-stage-1
                ckpt1 = self.stage1(steps1)
                self.report["stage1_checkpoint"] = str(ckpt1)
                self.save_report()
            if a.phase != "stage1":
                self.rest(ckpt1)
        except Exception as e:  # keep what was measured
            self.report["errors"].append(f"{type(e).__name__}: {e}")
            self.say(f"stopped: {type(e).__name__}: {e}")
        self.finish()
        return 1 if self.report["errors"] else 0

    def rest(self, ckpt1: Path) -> None:
        # stage-1 evaluations run beside each other (the model is small; the GPU has room)
        t_eval = min(240.0, self.left(reserve=STAGE2_RESERVE + 30))
        jobs = [("eval_stage1_print", self.eval_job("eval_stage1_print", ckpt1, "print", 256, wait=False, timeout=t_eval)),
                ("eval_stage1_handwrite", self.eval_job("eval_stage1_handwrite", ckpt1, "handwrite", 128, wait=False, timeout=t_eval))]
        infer1 = self.infer_job("infer_stage1", ckpt1, "print", timeout=min(180.0, t_eval))
        for name, job in jobs:
            self.collect_eval(name, self.wait(job))
        self.collect_infer("infer_stage1", infer1)
        self.save_report()

        steps2 = self.plan_stage2()
        self.report["stage2_planned_steps"] = steps2
        ckpt2 = self.stage2(ckpt1, steps2)
        self.report["stage2_checkpoint"] = str(ckpt2)
        self.save_report()
        t_final = min(240.0, self.left(reserve=5, floor=20))
        infer2 = self.infer_job("infer_stage2", ckpt2, "handwrite", timeout=min(180.0, t_final))
        self.collect_eval("eval_stage2_handwrite", self.eval_job("eval_stage2_handwrite", ckpt2, "handwrite", 128, timeout=t_final))
        self.collect_infer("infer_stage2", infer2)

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
        if self.report["warnings"]:
            self.say("warnings: " + json.dumps(self.report["warnings"]))
        if self.a.phase == "stage1":
            ckpt = self.report.get("stage1_checkpoint")
            self.say(f"phase stage1 done; {ckpt} waits for --phase rest" if ckpt else "phase stage1 ended without a stage-1 checkpoint")
        else:
            self.say("results:\n" + self.report["table_markdown"])
            self.say("targets: " + json.dumps(res))
        if self.report["errors"]:
            self.say("errors: " + json.dumps(self.report["errors"]))
        self.save_state()

    def save_state(self) -> None:
        """Phase stage1: what phase rest merges into the full report (this report and log.txt), in work_dir."""
        if self.a.phase != "stage1":
            return
        self.log.flush()
        state = {"report": self.report, "log": (self.out / "log.txt").read_text(errors="replace")}
        tmp = self.work / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, ensure_ascii=False) + "\n")
        os.replace(tmp, self.work / STATE_FILE)


def eval_every(steps: int, num_evals: int) -> int:
    """Evaluate (and save) every this many steps; planned step counts are multiples of num_evals, so the last
    eval falls on the last step (ocrtune sft also evaluates at the last step: no second eval right after)."""
    return max(1, steps // max(1, num_evals))


def round_steps(steps: int, num_evals: int) -> int:
    n = max(1, num_evals)
    return max(n, steps - steps % n)


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


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def complete_checkpoints(run: Path) -> list[Path]:
    """checkpoint-N folders of an ocrtune run that were saved whole (trainer_state.json is written last), oldest first."""
    found = [p for p in Path(run).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


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
    out = ["## Results on LaTeX_OCR", ""]
    if r.get("phase") == "stage1":
        out += ["Partial report of phase stage1 (probe + stage-1 training): the evaluations and stage 2 run in "
                "`--phase rest`, whose report covers both calls.", ""]
    out += [r.get("table_markdown", ""), ""]
    for k, t in (r.get("targets") or {}).items():
        out.append(f"- {k}: {t['value']} (target {t['target']}: {'met' if t['met'] else 'NOT met'})")
    s1, s2 = r.get("stage1", {}), r.get("stage2", {})
    for name, s in (("stage 1", s1), ("stage 2", s2)):
        if s.get("steps"):
            out.append(f"- {name}: {s['steps']} steps x batch {s['batch_size']} = {s['samples_seen']} samples "
                       f"({s['epochs']} epochs of {s['train_rows']} rows) in {s.get('train_seconds')} s of training "
                       f"({s.get('seconds_per_step')} s/step), peak memory {s.get('peak_memory_gib')} GiB")
    sysinfo = r.get("system", {})
    phases = r.get("phases", {})
    calls = " + ".join(f"phase {k} {v.get('seconds')} s" for k, v in phases.items())
    out += [f"- machine: {sysinfo.get('gpu', 'cpu')}, torch {sysinfo.get('torch')}, transformers {sysinfo.get('transformers')}; "
            f"whole run {r.get('timings_s', {}).get('total')} s ({calls})"]
    if len(phases) > 1:
        out += ["- device calls: " + "; ".join(f"`{v.get('command')}`" for v in phases.values())]
    out += ["", "Commands (in the order run):", "", "```bash"]
    out += [r["commands"][k] for k in r.get("commands", {})]
    out += ["```", ""]
    for title, key in (("Warnings", "warnings"), ("Errors", "errors")):
        if r.get(key):
            out += [f"{title}:", ""] + [f"- {e}" for e in r[key]] + [""]
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
    a = parse_args(argv)
    found = None
    if a.phase == "rest":
        try:
            found = find_stage1(Path(a.work_dir))
        except Stage1Missing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return Recipe(a, found).run()


if __name__ == "__main__":
    sys.exit(main())
