#!/usr/bin/env python3
"""LaTeX OCR from scratch: synthetic + real printed formulas, then LoRA on handwriting.

  synth    `ocrtune synth`: --synth_rows new formulas made from the print train formulas (--mutate; half of them
           joined from two formulas' halves, --synth_recombine, and, independently, half with their symbols redrawn,
           --synth_scramble), rendered with real LaTeX in the LaTeX_OCR print style; the print and handwrite validation
           formulas (and every --extra_eval set) are excluded, so evaluation is on formulas never seen
  stage 1  `ocrtune sft --model small` on synth + real print rows, on every visible GPU (NPROC_PER_NODE,
           DDP), compiled (--torch_compile, --stage1_torch_compile; on GPUs): rank-64 LoRA over the random
           weights (LM + vision tower, lr 1e-3; --stage1_lora_rank), folded into them and restarted from zero, in
           5 cycles over the schedule (ReLoRA, --stage1_relora_cycles), with the tied embeddings trained whole
           (--stage1_modules_to_save embed_tokens), merged before the evaluations;
           or, with --stage1_lora_rank 0, full fine-tuning with the vision tower trained, at lr 1e-4 (at 1e-3
           it collapses the image features: bench/learning/sweep_2026-12-01/FINDINGS.md)
  stage 2  `ocrtune sft --model <stage-1 checkpoint> --train_type lora` on LaTeX_OCR handwrite
  grpo     optional (--grpo_seconds N): `ocrtune rlhf --rlhf_type grpo --reward_funcs cdm` over the merged stage 1
           on print train formulas, for N seconds after stage 2; evaluated on print validation with CDM beside
           stage 1 (bench/learning/grpo_vs_sft.py compares it with as many seconds of more SFT)
  evals    `ocrtune eval --metrics bleu,edit_distance,exact_match,token_acc` (greedy generation): stage 1 on
           print validation, stage 1 and 2 on handwrite validation, and each --extra_eval set

Every step is the real ocrtune command line, run as a subprocess, and goes into the report.

Phases (--phase), one device call of at most 10 minutes each, made back to back on the same machine so
that --work_dir (default .work/from_scratch, git-ignored) survives between them:
  train   synth rendering (the CPUs but two per GPU), then stage 1: by time (--schedule_by time, the default),
          warmed up and held at its rate until `ocrtune sft --max_time` stops it before the deadline, saving the
          step it stopped after; by steps, a cosine planned over the steps that fit this phase plus
          --stage1_rest_seconds of the next at the pace a short probe measures first (--stage1_seconds_per_step
          skips it). The probe runs after the rendering because its dataloader shares the CPUs (run 6's
          concurrent probe read 0.23 s a step where stage 1 then ran 0.12 s, and left 40% of the call unused)
  rest    stage 1 resumed (`--resume_from_checkpoint last`): by time, its rate decays to 0 along a cosine from its
          first step to its --max_time, where it ends (`--lr_decay_seconds`); by steps, to the end of its
          schedule. Then merged, stage 1's evaluations alongside stage 2 (they share the GPU: the small model
          leaves it mostly idle; stage 2 by time decays over its --stage2_seconds), stage 2's evaluation as soon as
          stage 2 ends, the report
  all     both in one call, stage 1 planned and trained to its end within it (smoke tests)

Writes to --report_dir: report.json ({"print": {...}, "handwrite_before": {...}, "handwrite_after": {...},
"extra": {name: {...}}, "command", "device", plus settings, commands, timings and the training logs),
results.md, predictions.jsonl (the first 20 predictions of each evaluation) and log.txt.

On the GPU machine (two calls):
  bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir $OUT
  bash examples/latex_ocr_from_scratch.sh --phase rest --data_dir .carry/latex --report_dir $OUT
On a CPU (tiny model, a few rows and steps; needs LaTeX for the synth step):
  python examples/latex_ocr_from_scratch.py --smoke --phase all --report_dir r
(--smoke without --data_dir makes its data folder from the bundled sample rows, under --work_dir.)

--data_dir is checked before any step runs; the first step that fails stops the recipe with one line
(`error: <step> failed (exit N): <its last line>; see <its log>`), exit status 1, the report written so far.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # ocrtune from this checkout, as the subprocesses get it (PYTHONPATH below)
from ocrtune.checkpoint import list_checkpoints  # noqa: E402  (complete checkpoint-N folders, oldest first)
METRICS = "bleu,edit_distance,exact_match,token_acc"
KEYS = ("bleu4", "exact_match", "token_acc", "edit_distance")  # the report's per-set metrics
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",  # language model
                "qkv", "proj", "fc1", "fc2"]  # vision tower
TARGETS = {"print_bleu4": 0.6, "handwrite_bleu4_gain": 0.15}
DEADLINES = {"train": 560.0, "rest": 560.0, "all": 3600.0}
PIXELS = {"min_pixels": 30_000, "max_pixels": 120_000}  # ~40-150 visual tokens a LaTeX_OCR print image
GUESSED_PACE = 0.2  # s a stage-1 step, --schedule_by time's size of the ReLoRA cycles and evaluations (not of the schedule)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__[__doc__.index("Phases"):])
    p.add_argument("--phase", choices=("train", "rest", "all"), default="all")
    p.add_argument("--data_dir", default=None,
                   help="folder with print/ and handwrite/ {train,validation}.parquet (default .carry/latex; with "
                        "--smoke, the bundled sample rows copied into <work_dir>/smoke_data)")
    p.add_argument("--work_dir", default=None, help="runs and synthetic data (default <repo>/.work/from_scratch)")
    p.add_argument("--report_dir", default="bench/learning")
    p.add_argument("--extra_eval", action="append", default=[], metavar="NAME=PATH",
                   help="another evaluation set (a dataset file or folder), reported under extra.NAME; its formulas "
                        "are excluded from the synthetic data too (repeatable)")
    p.add_argument("--model", default="small")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for DDP (default: all visible)")
    p.add_argument("--synth_rows", type=int, default=400_000, help="new formulas to render (ocrtune synth --mutate)")
    p.add_argument("--synth_scramble", type=float, default=0.5,
                   help="share of the synthetic formulas with their symbols redrawn (ocrtune synth --scramble): "
                        "run 10's model learned the mutated formulas' language (train token accuracy 0.91, validation 0.68)")
    p.add_argument("--synth_recombine", type=float, default=0.5,
                   help="share of the synthetic formulas joined from two train formulas' halves at top-level relations "
                        "or commas (ocrtune synth --recombine): new overall structures (run 13 with 0.5: print "
                        "validation loss 0.65 against run 12's 0.92, BLEU-4 0.429 against 0.321, with 16%% more steps)")
    p.add_argument("--synth_procs", type=int, default=None, help="rendering processes (default: cores - 2 x GPUs)")
    p.add_argument("--tex_root", default=os.environ.get("OCRTUNE_TEX_ROOT"), help="portable TeX tree for ocrtune synth")
    p.add_argument("--packing_tokens", type=int, default=65536,
                   help="stage-1 tokens per GPU per step (~250 samples; run 8: print BLEU-4 0.149 against run 7's 0.122 "
                        "at 16384, the small model being bound by per-step overhead)")
    p.add_argument("--stage1_augment", default="false", choices=("true", "false"),
                   help="augment stage-1 images (print validation is clean renders in the synth style: off learns faster)")
    p.add_argument("--learning_rate", type=float, default=None,
                   help="stage 1's rate (default 1e-4 for full fine-tuning, 1e-3 with --stage1_lora_rank)")
    p.add_argument("--stage1_lora_rank", type=int, default=64,
                   help="train stage 1 as rank-R LoRA over the random weights (run 7: print BLEU-4 0.122, against "
                        "0.042 for full fine-tuning in run 6); 0: full fine-tuning")
    p.add_argument("--stage1_modules_to_save", nargs="*", default=["embed_tokens"],
                   help="with --stage1_lora_rank: modules trained whole beside the LoRA (the tied embeddings: in the "
                        "digits sweep they fit the answer format at once and read sooner); none (or the flag alone): "
                        "LoRA only, as runs 7-8")
    p.add_argument("--stage1_relora_cycles", type=int, default=5,
                   help="with --stage1_lora_rank: stage 1's LoRA is folded into the weights and restarted from zero this "
                        "many times over its schedule (ocrtune sft --relora_steps; stage 1b of run 11, one fresh LoRA over "
                        "the merged stage 1, lifted print BLEU-4 0.22 -> 0.30); 1: one adapter throughout, as runs 7-11")
    p.add_argument("--vit_lr", type=float, default=None,
                   help="stage 1's vision-tower rate (default: --learning_rate; see bench/learning/sweep_2026-12-01)")
    p.add_argument("--aligner_lr", type=float, default=None, help="stage 1's merger rate (default: --learning_rate)")
    p.add_argument("--min_pixels", type=int, default=None,
                   help=f"image size bounds of both stages (default {PIXELS['min_pixels']:,}; phase rest: phase train's)")
    p.add_argument("--max_pixels", type=int, default=None, help=f"(default {PIXELS['max_pixels']:,}; phase rest: phase train's)")
    p.add_argument("--workers", type=int, default=None,
                   help="stage 1's dataloader workers per GPU (default: cores / GPUs - 3; stage 2 takes at most 8)")
    p.add_argument("--probe_steps", type=int, default=60,
                   help="steps of the speed probe; its pace is read over the second half (run 10's 30-step probe read 0.22 s "
                        "a step, where stage 1, fed by its loader over longer, ran 0.36), leaving out the intervals in "
                        "which an epoch of its print rows ended (run 14's read 0.39 for 0.26)")
    p.add_argument("--stage1_torch_compile", default="auto", choices=("auto", "true", "false"),
                   help="stage 1 with `ocrtune sft --torch_compile` (auto: where there are GPUs): its decoder layers and "
                        "ViT blocks compiled, 0.099 s a step on one H200 at 65,536 tokens against 0.173 eager "
                        "(bench/learning/profile_compile_fed_h200.json); fed by 13 loader workers, 0.18 against 0.247 "
                        "(run 15), after --stage1_compile_seconds of compiling")
    p.add_argument("--stage1_compile_seconds", type=float, nargs=2, default=[70.0, 35.0], metavar=("TRAIN", "REST"),
                   help="seconds stage 1's first steps spend compiling in phase train (cold) and, resumed, in phase rest "
                        "(inductor's caches on the same machine; run 15: ~60 and ~35); planned in beside the steps")
    p.add_argument("--stage1_seconds_per_step", type=float, default=None,
                   help="stage 1's pace on this machine, as an earlier probe read it (skips the probe and its ~60 s of "
                        "phase train; run 12's probe on one H200: 0.2268); stage 1 is planned from it as from a probe's "
                        f"(default with --schedule_by time: {GUESSED_PACE}, compiled runs 15-16's 0.18-0.22, run 17's 0.15 with 8-bit pixels)")
    p.add_argument("--schedule_by", default="time", choices=("time", "steps"),
                   help="time: stage 1 warms up, holds its rate through phase train and decays it to 0 along a cosine "
                        "over its resumed run in phase rest, ending by the clock (`ocrtune sft --lr_decay_seconds`), and "
                        "stage 2 decays over its seconds; the pace only sizes the ReLoRA cycles and evaluations, so no "
                        "probe runs (runs 14-16 were each planned from a pace that the run then missed, by 25-50%%, and "
                        "stopped before their cosine ended or left time unused). steps: cosines over steps planned from "
                        "the probe's pace (--stage1_steps / --stage2_steps fix them and imply it)")
    p.add_argument("--stage1_steps", type=int, default=None, help="fixed stage-1 steps (skips the probe)")
    p.add_argument("--stage2_steps", type=int, default=None)
    # run 11's phase rest ended at 414 s of its 560 with 280 / 220 / 100: stage 1 got 40 s more of it, stage 2 30 s
    # less; run 12's ended at 446 s (stage 2's plan kept 100 s for its start-up and a 21 s evaluation): 40 s more
    p.add_argument("--stage1_rest_seconds", type=float, default=360.0,
                   help="seconds of stage-1 steps planned into phase rest (resumed there); 0: stage 1 ends in phase train")
    p.add_argument("--stage1_train_seconds", type=float, default=None,
                   help="stage 1's --max_time (default: what is left of phase train less 45 s; in phase all, less "
                        "--rest_reserve_seconds and 20 s)")
    p.add_argument("--rest_reserve_seconds", type=float, default=140.0,
                   help="seconds kept after stage 1 (resumed in phase rest; in phase all, its plan and --max_time) for "
                        "the merge, the evaluations and stage 2")
    p.add_argument("--stage2_seconds", type=float, default=70.0)
    p.add_argument("--stage2_batch_size", type=int, default=32)
    p.add_argument("--stage2_learning_rate", type=float, default=1e-3)
    p.add_argument("--grpo_seconds", type=float, default=0.0,
                   help="after stage 2, GRPO with the cdm reward over the merged stage 1 on print train for this many "
                        "seconds (0: no GRPO stage); stage 1's and its print evaluations then add CDM and ExpRate@CDM "
                        "(needs pdflatex or --tex_root)")
    p.add_argument("--grpo_learning_rate", type=float, default=3e-5)
    p.add_argument("--grpo_num_generations", type=int, default=8)
    p.add_argument("--grpo_batch_size", type=int, default=128, help="completions a micro-batch (16 prompts x 8)")
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--lora_alpha", type=int, default=64)
    p.add_argument("--eval_rows", type=int, default=None, help="rows of each validation set (default: all)")
    p.add_argument("--train_rows", type=int, default=None, help="rows of each real train split (smoke tests)")
    p.add_argument("--deadline_seconds", type=float, default=None, help=f"this phase's time limit (default {DEADLINES})")
    p.add_argument("--smoke", action="store_true", help="tiny model, a few rows and steps: checks the recipe on a CPU")
    a = p.parse_args(argv)
    for name, low, high in RANGES:  # one argparse error line for a value the recipe can't run with
        value = getattr(a, name)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not (low <= v <= high and v == v):
                p.error(f"--{name} must be between {low:g} and {high:g} (got {v:g})")
    a.work_dir = Path(a.work_dir).resolve() if a.work_dir else REPO / ".work" / "from_scratch"
    a.deadline_seconds = a.deadline_seconds or DEADLINES[a.phase]
    a.max_new_tokens = 256
    if a.stage1_modules_to_save in (["none"], ["None"]):  # the help's spelling of "LoRA only"
        a.stage1_modules_to_save = []
    if a.learning_rate is None:
        a.learning_rate = 1e-3 if a.stage1_lora_rank else 1e-4
    a.stage1_torch_compile = a.stage1_torch_compile == "true" or (a.stage1_torch_compile == "auto" and gpu_count() > 0)
    if not a.stage1_torch_compile:
        a.stage1_compile_seconds = [0.0, 0.0]
    if a.data_dir is None:
        a.data_dir = str(smoke_data(a.work_dir)) if a.smoke else ".carry/latex"
    if a.smoke:
        a.model, a.packing_tokens, a.stage1_steps, a.stage2_steps, a.stage2_batch_size = "tiny", 1200, 6, 4, 4
        a.synth_rows, a.train_rows, a.eval_rows, a.workers, a.max_new_tokens = 24, a.train_rows or 48, a.eval_rows or 8, 0, 24
        if a.stage1_train_seconds is None and a.phase == "train":  # stops after its first step, phase rest resumes it
            a.stage1_train_seconds = 0.0
        a.min_pixels, a.max_pixels = a.min_pixels or 20_000, a.max_pixels or 60_000
        a.grpo_num_generations, a.grpo_batch_size = 4, 8
    return a


DAY = 86_400.0
# the numeric flags' ranges (inclusive; None, a flag's "not given", passes)
RANGES = [("synth_rows", 0, 10**8), ("synth_scramble", 0, 1), ("synth_recombine", 0, 1), ("synth_procs", 1, 4096),
          ("gpus", 0, 4096), ("packing_tokens", 16, 2**24), ("learning_rate", 1e-12, 10), ("stage1_lora_rank", 0, 4096),
          ("stage1_relora_cycles", 0, 10**4), ("vit_lr", 0, 10), ("aligner_lr", 0, 10), ("min_pixels", 1, 10**8),
          ("max_pixels", 1, 10**8), ("workers", 0, 1024), ("probe_steps", 1, 10**6), ("stage1_compile_seconds", 0, DAY),
          ("stage1_seconds_per_step", 1e-6, DAY), ("stage1_steps", 0, 10**8), ("stage2_steps", 0, 10**8),
          ("stage1_rest_seconds", 0, DAY), ("stage1_train_seconds", 0, DAY), ("rest_reserve_seconds", 0, DAY),
          ("stage2_seconds", 0, DAY), ("stage2_batch_size", 1, 10**5), ("stage2_learning_rate", 1e-12, 10),
          ("lora_rank", 1, 4096), ("lora_alpha", 1, 10**5), ("eval_rows", 1, 10**8), ("train_rows", 1, 10**8),
          ("deadline_seconds", 1, 30 * DAY), ("grpo_seconds", 0, DAY), ("grpo_learning_rate", 1e-12, 10),
          ("grpo_num_generations", 2, 4096), ("grpo_batch_size", 1, 10**5)]


SPLITS = [(subset, split) for subset in ("print", "handwrite") for split in ("train", "validation")]


def smoke_data(work_dir: Path) -> Path:
    """A data folder for --smoke made from the package's bundled sample rows (both subsets the same rows)."""
    from ocrtune.data.registry import SAMPLE_DIR
    data = Path(work_dir) / "smoke_data"
    for subset, split in SPLITS:
        target = data / subset / f"{split}.parquet"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(SAMPLE_DIR / f"{split}.parquet", target)
    return data


def check_data_dir(data_dir: str) -> None:
    """Before any step: every step reads these files, and a missing one failed each step in turn."""
    missing = [f"{subset}/{split}.parquet" for subset, split in SPLITS
               if not (Path(data_dir) / subset / f"{split}.parquet").is_file()]
    if missing:
        raise UsageError(f"--data_dir {data_dir} lacks {', '.join(missing)}; give the folder that holds print/ and "
                         "handwrite/ {train,validation}.parquet (LaTeX_OCR's subsets), or run --smoke without "
                         "--data_dir to use the bundled sample rows")


class UsageError(Exception):
    """A bad argument found before any step ran: one line, exit status 2."""


class StepFailed(Exception):
    """A step exited non-zero: the recipe stops there (one line, exit status 1)."""


def gpu_count() -> int:
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def probe_pace(logs: list[dict]) -> float:
    """Seconds a step over the probe's second half (its steady part), from its train logs, leaving out the intervals
    in which an epoch ended. The probe reads print train alone, an epoch every ~40 steps, where stage 1 has one every
    ~1,000: a new epoch's loader starts its workers afresh, ~3 s the GPU waits (run 14's probe, at twice the visual
    tokens, had the boundary inside its measured half and read 0.39 s a step where stage 1 then ran 0.26)."""
    pts = [(x["step"], x["step"] / x["train_speed(iter/s)"], x.get("epoch", 0.0)) for x in logs]
    pairs = list(zip(pts[len(pts) // 2:], pts[len(pts) // 2 + 1:]))
    # an interval is left out when an epoch ends in it, or ended exactly at its start (its first fetch is the new one's)
    steady = [(a, b) for a, b in pairs if math.floor(a[2]) == math.floor(b[2]) and a[2] != math.floor(a[2])] or pairs
    return sum(b[1] - a[1] for a, b in steady) / sum(b[0] - a[0] for a, b in steady)


class Recipe:
    def __init__(self, a):
        self.a, self.t0 = a, float(os.environ.get("LATEX_OCR_T0", time.time()))
        self.data, self.work, self.out = Path(a.data_dir).resolve(), a.work_dir, Path(a.report_dir).resolve()
        self.failed: str | None = None  # the first failed step's one line
        self.gpus = a.gpus if a.gpus is not None else gpu_count()
        cores = os.cpu_count() or 2
        self.workers = a.workers if a.workers is not None else max(2, cores // max(1, self.gpus) - 3)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.log = open(self.out / "log.txt", "a", buffering=1)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", OCRTUNE_CACHE=str(self.work / "cache"),
                        HF_DATASETS_CACHE=str(self.work / "hf_datasets"),
                        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
        self.state_path = self.work / "state.json"
        self.report = read_json(self.state_path) if a.phase == "rest" else {}
        for k, default in PIXELS.items():  # stage 2 sees images as stage 1 did, unless told otherwise
            if getattr(a, k) is None:
                setattr(a, k, self.report.get("settings_train", {}).get(k) or default)
        self.report.setdefault("commands", {})
        self.report.setdefault("timings_s", {})
        self.report.setdefault("errors", [])
        self.report.setdefault("phases", {})[a.phase] = " ".join(shlex.quote(x) for x in sys.argv)
        self.report["command"] = " ; ".join(self.report["phases"].values())
        self.report["device"] = device_name(self.gpus)
        self.report["settings_" + a.phase] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()}

    # ------------------------------------------------------------ plumbing
    def say(self, msg: str) -> None:
        line = f"[{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.log.write(line + "\n")

    def left(self, reserve: float = 0.0) -> float:
        return max(20.0, self.a.deadline_seconds - (time.time() - self.t0) - reserve)

    def start(self, name: str, args: list[str], gpus: int = 0, devices: str | None = None) -> dict:
        """Start `ocrtune <args>`; `gpus` > 1 runs it under DDP (NPROC_PER_NODE, as SWIFT users do)."""
        env = dict(self.env)
        prefix = ""
        if gpus > 1:
            env["NPROC_PER_NODE"] = str(gpus)
            env["MASTER_PORT"] = str(29500 + len(self.report["commands"]))
            prefix = f"NPROC_PER_NODE={gpus} "
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
            prefix = f"CUDA_VISIBLE_DEVICES={devices} " + prefix
        shown = prefix + "ocrtune " + " ".join(shlex.quote(x) for x in args)
        self.report["commands"][name] = shown
        self.say(f"$ {shown}")
        logf = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen(self.ocrtune_command(args), cwd=str(self.work), env=env,
                                stdout=logf, stderr=subprocess.STDOUT)
        return {"name": name, "proc": proc, "start": time.time(), "logf": logf}

    def ocrtune_command(self, args: list[str]) -> list[str]:
        return [sys.executable, "-m", "ocrtune", *args]

    def wait(self, job: dict, timeout: float) -> int:
        stopped = False
        try:
            rc = job["proc"].wait(timeout=max(1.0, timeout - (time.time() - job["start"])))
        except subprocess.TimeoutExpired:
            stopped = True
            job["proc"].terminate()
            try:
                rc = job["proc"].wait(timeout=20)
            except subprocess.TimeoutExpired:
                job["proc"].kill()
                rc = job["proc"].wait()
            self.report["errors"].append(f"{job['name']}: stopped at the deadline after {timeout:.0f}s")
        job["logf"].close()
        secs = round(time.time() - job["start"], 1)
        self.report["timings_s"][job["name"]] = secs
        tail = (self.work / f"{job['name']}.log").read_text(errors="replace").replace("\r", "\n").splitlines()
        # sft's line on where its start-up went (set-up, first batch, first step), then the end of the log
        tail = [t for t in tail if "start-up: set-up" in t][:1] + \
            [t for t in tail if t.strip() and "it/s]" not in t and "step/s]" not in t][-8:]
        for t in tail:
            self.log.write(f"    {job['name']}| {t}\n")
        if rc != 0:
            self.report["errors"].append(f"{job['name']}: exit {rc}: " + " | ".join(tail[-3:]))
            if self.failed is None and not stopped:  # a step stopped at the deadline is reported, not a failure
                last = tail[-1].strip() if tail else "no output"
                self.failed = f"{job['name']} failed (exit {rc}): {last}; see {self.work / (job['name'] + '.log')}"
        self.say(f"{job['name']} {'done' if rc == 0 else f'FAILED (exit {rc})'} in {secs}s")
        return rc

    def run(self, name: str, args: list[str], timeout: float, **kw) -> int:
        return self.wait(self.start(name, args, **kw), timeout)

    def stop_if_failed(self) -> None:
        """Between steps: after a failed one, the next would fail too (or report on nothing)."""
        if self.failed:
            raise StepFailed(self.failed)

    def path(self, subset: str, split: str) -> str:
        rows = self.a.train_rows if split == "train" else self.a.eval_rows
        p = str(self.data / subset / f"{split}.parquet")
        return f"{p}#{rows}" if rows else p

    def extra(self) -> dict[str, str]:
        out = {}
        for item in self.a.extra_eval:
            name, sep, path = item.partition("=")
            if not sep or not name or not Path(path).exists():
                raise SystemExit(f"error: --extra_eval {item!r} is not NAME=PATH of an existing dataset file or folder")
            out[name] = str(Path(path).resolve())
        return out

    def sft_common(self, workers: int | None = None) -> list[str]:
        a = self.a
        return ["--min_pixels", str(a.min_pixels), "--max_pixels", str(a.max_pixels), "--packing", "true",
                "--dataloader_num_workers", str(self.workers if workers is None else workers), "--gradient_checkpointing", "false",
                "--add_output_dir_suffix", "false", "--report_to", "none", "--save_total_limit", "1",
                # Liger's kernels made the small model's stage-1 step slower on an H200 (0.276 against 0.205 s at
                # 65,536 tokens: bench/learning/profile_liger_h200.json); sft's default agrees below hidden size 1024,
                # and the recipe says so whatever --model it is given
                "--use_liger", "false"]

    # ------------------------------------------------------------ phase train
    def synth(self) -> subprocess.Popen:
        """Always `ocrtune synth`: on a folder it made with the same flags it renders only missing shards, and it
        refuses one made with other flags (e.g. another --synth_scramble) instead of the recipe reusing it."""
        a = self.a
        out = self.work / "synth"
        excludes = [str(self.data / s / "validation.parquet") for s in ("print", "handwrite")] + list(self.extra().values())
        procs = a.synth_procs or max(1, (os.cpu_count() or 2) - 2 * max(1, self.gpus))
        args = ["synth", "--dataset", self.path("print", "train"), "--mutate", str(a.synth_rows), "--include_input", "false",
                *(["--scramble", str(a.synth_scramble)] if a.synth_scramble else []),
                *(["--recombine", str(a.synth_recombine)] if a.synth_recombine else []),
                "--exclude", *excludes, "--output_dir", str(out), "--seed", "0", "--num_proc", str(procs)]
        if a.tex_root:
            args += ["--tex_root", a.tex_root]
        return self.start("synth", args)

    def stage1_args(self, steps: int, data: list[str], out: Path) -> list[str]:
        a = self.a
        if a.stage1_lora_rank:  # the sweep's setting: no dropout, alpha = 2 x rank, LM + vision tower linears
            kind = ["--train_type", "lora", "--lora_rank", str(a.stage1_lora_rank), "--lora_alpha",
                    str(2 * a.stage1_lora_rank), "--lora_dropout", "0", "--target_modules", *LORA_TARGETS]
            if a.stage1_modules_to_save:
                kind += ["--modules_to_save", *a.stage1_modules_to_save]
            if a.stage1_relora_cycles > 1:  # a cycle's steps; the last cycle ends with the schedule
                kind += ["--relora_steps", str(-(-steps // a.stage1_relora_cycles))]
        else:
            kind = ["--train_type", "full", "--freeze_vit", "false"]
        return ["sft", "--model", a.model, *kind, "--augment", a.stage1_augment,
                "--dataset", *data, "--val_dataset", f"{self.data / 'print' / 'validation.parquet'}#{a.eval_rows or 200}",
                "--packing_tokens", str(a.packing_tokens),
                "--learning_rate", str(a.learning_rate), *self.stage1_schedule(steps),
                # teacher-forced evaluations only: phase rest generates over all of print validation, and a generation
                # pass here (200 rows, up to 256 tokens) cost run 9 tens of seconds each, part of why it ran out of time
                "--eval_steps", str(-(-steps // 4)), "--save_steps", str(-(-steps // 4)),  # ceil: no 5th at the end
                "--logging_steps", str(max(1, min(20, steps // 40))), "--predict_with_generate", "false",
                "--max_new_tokens", str(a.max_new_tokens), "--eval_batch_size", "200",
                "--output_dir", str(out), "--torch_compile", str(a.stage1_torch_compile).lower(), *self.vision_rates(),
                *self.sft_common()]

    @property
    def stage1_by_time(self) -> bool:
        return self.a.schedule_by == "time" and self.a.stage1_steps is None

    def stage1_schedule(self, steps: int) -> list[str]:
        """By steps: warm-up and a cosine over `steps`. By time: `steps` is an estimate (it sizes the ReLoRA cycles
        and the evaluations); the rate warms up and holds, and the run's last process decays it by the clock
        (--lr_decay_seconds), so --max_steps is only a bound, 10x the estimate (a bound reached first would end the run
        undecayed: the tiny model on a CPU runs ~20x faster than the guess)."""
        if not self.stage1_by_time:
            return ["--warmup_ratio", "0.03", "--max_steps", str(steps)]
        return ["--lr_scheduler_type", "constant", "--warmup_steps", str(max(1, math.ceil(0.03 * steps))),
                "--max_steps", str(10 * steps)]

    def vision_rates(self) -> list[str]:
        a = self.a
        return [x for flag, lr in (("--vit_lr", a.vit_lr), ("--aligner_lr", a.aligner_lr)) if lr is not None
                for x in (flag, str(lr))]

    def pace(self) -> float:
        """Seconds per stage-1 step: --stage1_seconds_per_step, else the probe's (by time: else a guess, no probe)."""
        if self.a.stage1_seconds_per_step is None and self.stage1_by_time:
            self.a.stage1_seconds_per_step = GUESSED_PACE
        if self.a.stage1_seconds_per_step is None:
            return self.probe()
        # the start-up that the plan adds is run 12's probe's (35.4 s: imports, model, the loader's workers)
        self.report["probe"] = {"seconds_per_step": self.a.stage1_seconds_per_step, "startup_seconds": 35.4,
                                "given": True}
        self.say(f"stage-1 pace given, no probe: {json.dumps(self.report['probe'])}")
        return self.a.stage1_seconds_per_step

    def probe(self) -> float:
        """Seconds per stage-1 step here, from the probe's steady part (its second half)."""
        a = self.a
        run = self.work / "probe"
        shutil.rmtree(run, ignore_errors=True)
        args = self.stage1_args(a.probe_steps, [self.path("print", "train")], run)
        args[args.index("--predict_with_generate") + 1] = "false"
        args[args.index("--logging_steps") + 1] = str(max(1, a.probe_steps // 10))
        args[args.index("--save_steps") + 1] = str(10 ** 6)
        args[args.index("--eval_steps") + 1] = str(10 ** 6)
        wait = 200.0 + a.stage1_compile_seconds[0]
        rc = self.run("probe", args, timeout=min(wait, self.left(wait)), gpus=self.gpus)
        logs = [x for x in read_jsonl(run / "logging.jsonl") if x.get("train_speed(iter/s)")]
        if rc != 0 or len(logs) < 3:
            raise RuntimeError("the probe failed; see log.txt")
        sec = probe_pace(logs)
        last = logs[-1]["step"] / logs[-1]["train_speed(iter/s)"]
        self.report["probe"] = {"seconds_per_step": round(sec, 4),
                                "startup_seconds": round(self.report["timings_s"]["probe"] - last, 1)}
        self.say(f"probe: {json.dumps(self.report['probe'])}")
        shutil.rmtree(run, ignore_errors=True)
        return sec

    def phase_train(self) -> None:
        a = self.a
        for name in ("stage1", "stage2", "eval"):
            shutil.rmtree(self.work / name, ignore_errors=True)
        synth_ok = self.wait(self.synth(), timeout=self.left(300)) == 0
        self.stop_if_failed()
        sec = self.pace() if a.stage1_steps is None else None
        data = [self.path("print", "train")]
        shards = sorted((self.work / "synth").glob("*.parquet")) if synth_ok else []
        if shards:
            import pyarrow.parquet as pq
            data.insert(0, str(self.work / "synth"))
            self.report["synth"] = {"shards": len(shards), "rows": sum(pq.ParquetFile(s).metadata.num_rows for s in shards),
                                    "seconds": self.report["timings_s"].get("synth"), "scramble": a.synth_scramble,
                                    "recombine": a.synth_recombine}
        else:
            self.report["errors"].append("no synthetic rows: stage 1 trains on the real print rows only")
        steps, limit, timeout = self.plan_stage1(sec)
        run = self.work / "stage1"
        args = self.stage1_args(steps, data, run)
        # the step it ends at: by time, --max_steps is a bound (the clock ends the run in its last process)
        self.report["stage1_planned_steps"] = int(args[args.index("--max_steps") + 1])
        self.report["stage1_by_time"] = self.stage1_by_time
        self.report["stage1_args"] = args
        decay = ["--lr_decay_seconds", f"{limit / 2:.0f}"] if self.stage1_by_time and a.phase == "all" else []
        self.run("stage1", [*args, "--max_time", f"{limit:.0f}" if limit >= 1 else str(limit), *decay], timeout=timeout,
                 gpus=self.gpus)
        self.report["stage1"] = summarize_run(run)
        self.stop_if_failed()
        ckpts = list_checkpoints(run)
        self.report["stage1_steps_in_phase_train"] = step_of(ckpts[-1]) if ckpts else 0

    def plan_stage1(self, sec: float | None) -> tuple[int, float, float]:
        """Stage 1's steps (by steps its cosine schedule's length; by time the estimate that sizes its ReLoRA cycles and
        evaluations), its `--max_time` and the subprocess's time-out. What fits:
        start-up as the probe's plus 30 s to plan over the synthetic rows, 4 teacher-forced evaluations and 4 saves,
        25 s margin, at 1.1x the probe's seconds a step (run 9's stage 1 ran slower than its probe and was stopped
        at the deadline 312 steps short of its end). Phase train adds --stage1_rest_seconds of phase rest (stage 1
        resumes there) and stops 45 s before its deadline (--max_time counts from the run's set-up, after the
        imports: those, the last step, its save and the exit; run 10 ended 13-14 s after its limit). Phase all
        keeps --rest_reserve_seconds of its own deadline for the merge, the evaluations and stage 2. Compiled, the
        seconds its first steps compile are left out too (--stage1_compile_seconds: cold after a given pace, warm
        after the probe, which compiled first, and warm when phase rest resumes it)."""
        a = self.a
        cold, warm = a.stage1_compile_seconds  # --torch_compile's first steps (0 without it)
        if a.phase == "train":
            later, stop_before, kill_before = a.stage1_rest_seconds - warm, 45.0, 5.0
        else:  # all: the rest follows in this process, before the same deadline
            later, stop_before, kill_before = -a.rest_reserve_seconds, a.rest_reserve_seconds + 20, a.rest_reserve_seconds - 30
        if a.stage1_steps:
            steps = a.stage1_steps
        else:
            probed = not self.report["probe"].get("given")  # the probe compiled first: stage 1 starts from its caches
            fixed = self.report["probe"]["startup_seconds"] + 30 + 4 * 5 + 25 + (warm if probed else cold)
            steps = max(20, int((self.left() - fixed + later) / (1.1 * sec)))
        limit = a.stage1_train_seconds if a.stage1_train_seconds is not None else self.left(stop_before)
        return steps, limit, self.left(kill_before)

    # ------------------------------------------------------------ phase rest
    def eval_job(self, name: str, ckpt: Path, data: str, device: str | None, metrics: str = METRICS):
        result = self.work / "eval" / f"{name}.jsonl"
        result.parent.mkdir(parents=True, exist_ok=True)
        for stale in (result, result.with_name(f"{name}_summary.json")):  # a failed re-run must not report the last one
            stale.unlink(missing_ok=True)
        if self.a.grpo_seconds and name.endswith("_print"):  # the GRPO stage's comparison is on CDM
            metrics += ",cdm"
        args = ["eval", "--ckpt_dir", str(ckpt), "--val_dataset", data, "--metrics", metrics,
                "--infer_batch_size", "256", "--max_new_tokens", str(self.a.max_new_tokens), "--result_path", str(result)]
        return self.start(name, args, devices=device)

    def collect(self, name: str, rc: int) -> dict | None:
        s = read_json(self.work / "eval" / f"{name}_summary.json")
        if rc != 0 or not s:
            return None
        out = {k: s.get(k) for k in ("bleu4", "exact_match", "token_acc", "edit_distance_token", "edit_distance_char",
                                     "cdm", "exprate_cdm", "count") if k in s}
        out["edit_distance"] = s.get("edit_distance_token")
        with open(self.out / "predictions.jsonl", "a") as f:
            for row in read_jsonl(self.work / "eval" / f"{name}.jsonl")[:20]:
                f.write(json.dumps({"eval": name, **{k: row.get(k) for k in ("index", "reference", "prediction", "bleu4")}},
                                   ensure_ascii=False) + "\n")
        self.say(f"{name}: {json.dumps(out)}")
        return out

    def start_evals(self, ckpt: Path, sets: dict[str, str]) -> list[tuple[str, dict]]:
        """Start the evaluations of `ckpt`, one per set, all at once, spread over the GPUs (several share one:
        generation with the small model leaves a GPU mostly idle)."""
        return [(name, self.eval_job(name, ckpt, data, str(i % self.gpus) if self.gpus else None))
                for i, (name, data) in enumerate(sets.items())]

    def finish_evals(self, jobs: list[tuple[str, dict]], reserve: float = 60) -> dict:
        """Wait for evaluations started earlier, each until `reserve` seconds before the deadline (wait's timeout
        counts from the job's start: run 10's print evaluation, started before stage 2, was stopped when it was
        given what was left of the phase counted from its start)."""
        return {name: self.collect(name, self.wait(job, timeout=time.time() - job["start"] + self.left(reserve)))
                for name, job in jobs}

    def resume_stage1(self) -> None:
        """Phase train stopped stage 1 (--max_time) short of its planned steps: continue the same run, its
        schedule and data order, until its last step or until phase rest must go on (--rest_reserve_seconds)."""
        run, planned = self.work / "stage1", self.report.get("stage1_planned_steps")
        ckpts = list_checkpoints(run)
        if (self.a.phase == "all" or not ckpts or not planned or not self.report.get("stage1_args")
                or step_of(ckpts[-1]) >= planned):  # phase all: stopped by its --max_time, with nothing left to resume in
            return
        reserve = self.a.rest_reserve_seconds
        limit = max(1.0, self.left(reserve + 20))  # ends ~reserve before the deadline (imports, last step, save, exit)
        # by time: the rate decays from the resumed run's first step to its --max_time, where the run ends
        decay = ["--lr_decay_seconds", f"{limit:.0f}"] if self.report.get("stage1_by_time") else []
        self.say(f"stage 1 stopped at step {step_of(ckpts[-1])} of {planned}: resumed for at most {limit:.0f} s"
                 + (", its rate decaying to 0 by then" if decay else ""))
        self.run("stage1_resumed", [*self.report["stage1_args"], "--resume_from_checkpoint", "last",
                                    "--max_time", f"{limit:.0f}", *decay], timeout=self.left(reserve - 30), gpus=self.gpus)
        self.report["stage1"] = summarize_run(run)
        self.stop_if_failed()
        # its log's speeds restart with each process: the time is the two processes' (start-up included)
        self.report["stage1"]["train_seconds"] = round(sum(self.report["timings_s"].get(k, 0) for k in ("stage1", "stage1_resumed")), 1)

    def phase_rest(self) -> None:
        a = self.a
        self.resume_stage1()
        ckpts = list_checkpoints(self.work / "stage1")
        if not ckpts:
            raise SystemExit(f"error: no finished stage-1 checkpoint in {self.work / 'stage1'}: run --phase train first")
        ckpt1 = ckpts[-1]
        if (ckpt1 / "adapter_config.json").exists():  # a LoRA stage 1: stage 2 needs a whole model under it
            # at least 60 s: after a resumed stage 1 only --rest_reserve_seconds are left (run 10's merge: 13 s)
            if self.run("merge1", ["export", "--ckpt_dir", str(ckpt1), "--merge_lora", "true"],
                        timeout=max(60.0, self.left(150))):
                raise SystemExit(f"error: merging the stage-1 adapter {ckpt1} failed; see log.txt")
            from ocrtune.checkpoint import merged_dir_for
            ckpt1 = merged_dir_for(ckpt1)
        self.report["stage1_checkpoint"] = str(ckpt1)
        self.report.setdefault("stage1", summarize_run(self.work / "stage1"))
        sets = {"stage1_print": self.path("print", "validation"), "stage1_handwrite": self.path("handwrite", "validation")}
        sets.update({f"extra_{k}": v for k, v in self.extra().items()})
        evals = self.start_evals(ckpt1, sets)  # alongside stage 2, which needs only the merged model
        steps = a.stage2_steps or self.plan_stage2()
        by_time = a.schedule_by == "time" and not a.stage2_steps
        run = self.work / "stage2"
        self.run("stage2", [
            "sft", "--model", str(ckpt1), "--train_type", "lora", "--lora_rank", str(a.lora_rank),
            "--lora_alpha", str(a.lora_alpha), "--target_modules", *LORA_TARGETS, "--augment", "true",
            "--dataset", self.path("handwrite", "train"), "--val_dataset", self.path("handwrite", "validation"),
            "--batch_size", str(a.stage2_batch_size), "--learning_rate", str(a.stage2_learning_rate),
            *(self.stage2_by_time(steps) if by_time else ["--max_steps", str(steps)]),
            "--eval_steps", str(-(-steps // 2)), "--save_steps", str(10 * steps if by_time else steps),
            "--logging_steps", str(max(1, min(10, steps // 30))), "--output_dir", str(run),
            *self.sft_common(min(8, self.workers))], timeout=self.left(50), gpus=min(self.gpus, 1))
        self.report["stage2"] = summarize_run(run)
        ckpts2 = list_checkpoints(run)
        if self.failed:  # stage 1's evaluations are already running: their results still go into the report
            self.finish_evals(evals, reserve=10)
            self.stop_if_failed()
        if ckpts2:  # at once, beside stage 1's evaluations still running (run 10's print evaluation needed ~140 s)
            evals += self.start_evals(ckpts2[-1], {"stage2_handwrite": self.path("handwrite", "validation")})
        if a.grpo_seconds:
            evals += self.grpo(ckpt1)
        results = self.finish_evals(evals, reserve=10)
        if "grpo_print" in results:
            self.report["print_after_grpo"] = results.pop("grpo_print")
        first = {k: v for k, v in results.items() if k != "stage2_handwrite"}
        after = {k: v for k, v in results.items() if k == "stage2_handwrite"}
        self.report.update({"print": first.get("stage1_print"), "handwrite_before": first.get("stage1_handwrite"),
                            "handwrite_after": after.get("stage2_handwrite"),
                            "extra": {k[len("extra_"):]: v for k, v in first.items() if k.startswith("extra_")}})
        self.report.update(self.unseen_handwriting({n for n, r in {**first, **after}.items() if r}))
        self.report["targets"] = targets(self.report)

    def unseen_handwriting(self, finished: set[str]) -> dict:
        """Most handwrite validation formulas also appear in handwrite train (83 of 100 in LaTeX_OCR: CROHME
        has many writers per formula), so stage 2 can score by recognising a formula it was trained on. The
        same metrics over the rows whose formula is not in stage 2's train set show what generalizes.
        `finished`: the evaluations that succeeded; rows without a prediction are left out, as `ocrtune eval`
        leaves them out."""
        from ocrtune.data.loading import load_dataset
        from ocrtune.evaluate.metrics import compute_metrics
        train = load_dataset(self.path("handwrite", "train"))  # stage 2's rows: `path#N` is a seeded sample
        seen = {" ".join(m[-1]["content"].split()) for m in train["messages"]}
        out = {}
        for key, name in (("handwrite_before_unseen", "stage1_handwrite"), ("handwrite_after_unseen", "stage2_handwrite")):
            if name not in finished:
                continue
            res = [x for x in read_jsonl(self.work / "eval" / f"{name}.jsonl")
                   if isinstance(x.get("reference"), str) and isinstance(x.get("prediction"), str)]
            new = [x for x in res if " ".join(x["reference"].split()) not in seen]
            if res:
                out["handwrite_seen_in_train"] = len(res) - len(new)
            if new:
                m = compute_metrics([x["prediction"] for x in new], [x["reference"] for x in new])
                out[key] = {"bleu4": m.get("bleu4"), "exact_match": m.get("exact_match"),
                            "edit_distance": m["edit_distance_token"], "count": len(new)}
        return out

    def grpo(self, ckpt1: Path) -> list[tuple[str, dict]]:
        """The optional GRPO stage: the cdm reward over the merged stage 1 on print train formulas, by the clock
        (warm-up, a constant rate, a cosine to 0 over the second half), then its print evaluation (started, not
        awaited). Returns the evaluation job, none if GRPO failed or made no checkpoint."""
        a, run = self.a, self.work / "grpo"
        seconds = max(1.0, min(a.grpo_seconds, self.left(reserve=90)))
        self.run("grpo", [
            "rlhf", "--rlhf_type", "grpo", "--model", str(ckpt1), "--dataset", self.path("print", "train"),
            "--train_type", "lora", "--lora_rank", str(a.lora_rank), "--lora_alpha", str(a.lora_alpha),
            "--lora_dropout", "0", "--reward_funcs", "cdm", "--num_generations", str(a.grpo_num_generations),
            "--batch_size", str(a.grpo_batch_size), "--max_completion_length", str(a.max_new_tokens),
            "--learning_rate", str(a.grpo_learning_rate), "--lr_scheduler_type", "constant", "--warmup_steps", "2",
            "--max_steps", "100000", "--max_time", f"{seconds:.0f}", "--lr_decay_seconds", f"{seconds / 2:.0f}",
            "--save_steps", "100000", "--logging_steps", "5", "--min_pixels", str(a.min_pixels),
            "--max_pixels", str(a.max_pixels), "--output_dir", str(run), "--add_output_dir_suffix", "false",
            "--report_to", "none", "--save_total_limit", "1",
            *(["--tex_root", a.tex_root] if a.tex_root else [])], timeout=self.left(60), gpus=min(self.gpus, 1))
        self.report["grpo"] = summarize_run(run)
        ckpts = list_checkpoints(run)
        if self.failed or not ckpts:
            self.report["errors"].append(f"the GRPO stage made no checkpoint: {self.failed or 'see log.txt'}")
            self.failed = None  # optional: stage 1 and 2's results still stand
            return []
        return self.start_evals(ckpts[-1], {"grpo_print": self.path("print", "validation")})

    def stage2_by_time(self, steps: int) -> list[str]:
        """Stage 2 by the clock: warm-up, then a cosine to 0 over what is left of its seconds (`steps` estimates its
        steps; --max_steps bounds them at 10x). Run 16's stage 2, planned 519 steps from a pace it missed, was stopped
        at the deadline at step 311, its rate still high."""
        budget = self.stage2_budget()
        return ["--lr_scheduler_type", "constant", "--warmup_steps", str(max(1, steps // 20)), "--max_steps",
                str(10 * steps), "--max_time", f"{budget:.0f}", "--lr_decay_seconds", f"{budget:.0f}"]

    def plan_stage2(self) -> int:
        """Stage-2 steps for --stage2_seconds. Its small batches are bound by per-step overhead, not by samples: a
        step (batch 32) took 0.69x (run 8) and 0.76x (run 9) of the stage-1 probe's step on the same machine, whatever
        stage 1's tokens a step, so 0.8x, scaled by the batch beyond 32. (Run 9 planned by samples and stage 1's
        32,768 tokens a step: 2,731 steps for 150 s, and was stopped at the deadline at half of them.)"""
        probe = self.report.get("probe") or {}
        per_step = 0.8 * (probe.get("seconds_per_step") or 0.25) * max(1.0, self.a.stage2_batch_size / 32)
        return max(20, int(self.stage2_budget() / per_step))

    def stage2_budget(self) -> float:
        """Stage 2's seconds: --stage2_seconds, within what is left but 60 s (its start-up, ~5 s, then its evaluation)."""
        return min(self.a.stage2_seconds, self.left(reserve=60))

    # ------------------------------------------------------------ report
    def save(self) -> None:
        self.report["timings_s"]["phase_" + self.a.phase] = round(time.time() - self.t0, 1)
        text = json.dumps(self.report, indent=2, ensure_ascii=False) + "\n"
        (self.out / "report.json").write_text(text)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.state_path)
        (self.out / "results.md").write_text(results_markdown(self.report))

    def main(self) -> int:
        try:
            if self.a.phase in ("train", "all"):
                self.phase_train()
            if self.a.phase in ("rest", "all"):
                self.phase_rest()
            self.stop_if_failed()  # an evaluation
        except (RuntimeError, SystemExit, StepFailed) as e:
            if not isinstance(e, StepFailed):  # a failed step's exit and last lines are in the errors already
                self.report["errors"].append(str(e))
            self.say(f"stopped: {e}")
            self.failed = self.failed or str(e).removeprefix("error: ")
        finally:
            self.save()
        self.say("results:\n" + results_markdown(self.report))
        if self.failed:
            print(f"error: {self.failed}", file=sys.stderr)
            return 1
        return 1 if self.report["errors"] and not self.report.get("print") and self.a.phase != "train" else 0


# ---------------------------------------------------------------- helpers

def read_jsonl(path: Path) -> list[dict]:
    out = []
    if Path(path).exists():
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


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[-1])


def summarize_run(run: Path) -> dict:
    recs = read_jsonl(Path(run) / "logging.jsonl")
    train = [x for x in recs if "loss" in x]
    evals = [x for x in recs if "eval_loss" in x]
    out = {"run_dir": str(run), "train_log": [{k: x.get(k) for k in ("step", "loss", "token_acc", "learning_rate")} for x in train],
           "eval_log": [{k: v for k, v in x.items() if k.startswith("eval_") or k == "step"} for x in evals]}
    if train:
        last = train[-1]
        out.update(steps=last["step"], train_seconds=round(last["step"] / last["train_speed(iter/s)"], 1)
                   if last.get("train_speed(iter/s)") else None, final_loss=last.get("loss"),
                   final_token_acc=last.get("token_acc"), peak_memory_gib=max((x.get("memory(GiB)") or 0) for x in train))
    return out


def device_name(gpus: int) -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def targets(r: dict) -> dict:
    out = {}
    if r.get("print"):
        out["print_bleu4"] = {"value": r["print"]["bleu4"], "target": TARGETS["print_bleu4"],
                              "met": r["print"]["bleu4"] >= TARGETS["print_bleu4"]}
    if r.get("handwrite_before") and r.get("handwrite_after"):
        gain = round(r["handwrite_after"]["bleu4"] - r["handwrite_before"]["bleu4"], 6)
        out["handwrite_bleu4_gain"] = {"value": gain, "target": TARGETS["handwrite_bleu4_gain"],
                                       "met": gain >= TARGETS["handwrite_bleu4_gain"]}
    return out


def results_markdown(r: dict) -> str:
    rows = [("stage 1", "print validation", r.get("print")), ("stage 1", "handwrite validation", r.get("handwrite_before")),
            ("stage 2 (+LoRA)", "handwrite validation", r.get("handwrite_after"))]
    rows += [("stage 1", "handwrite validation, formulas not in handwrite train", r.get("handwrite_before_unseen")),
             ("stage 2 (+LoRA)", "handwrite validation, formulas not in handwrite train", r.get("handwrite_after_unseen"))]
    rows += [("stage 1", f"{k} (extra)", v) for k, v in (r.get("extra") or {}).items()]
    if r.get("print_after_grpo"):
        rows.insert(1, ("stage 1 + GRPO (cdm reward)", "print validation", r["print_after_grpo"]))
    cdm = any(e and "exprate_cdm" in e for _, _, e in rows)
    lines = ["| model | data | rows | BLEU-4 | exact match | token accuracy | edit distance |" + (" ExpRate@CDM |" if cdm else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if cdm else "")]
    for model, data, e in rows:
        f = (lambda k: f"{e[k]:.4f}" if e and isinstance(e.get(k), (int, float)) else "-")  # noqa: E731
        lines.append(f"| {model} | {data} | {(e or {}).get('count', '-')} | {f('bleu4')} | {f('exact_match')} | "
                     f"{f('token_acc')} | {f('edit_distance')} |" + (f" {f('exprate_cdm')} |" if cdm else ""))
    for k, t in (r.get("targets") or {}).items():
        lines.append(f"\n- {k}: {t['value']} (target {t['target']}: {'met' if t['met'] else 'NOT met'})")
    s1 = r.get("stage1") or {}
    if s1.get("steps"):
        lines.append(f"- stage 1: {s1['steps']} steps in {s1.get('train_seconds')} s, final train loss {s1.get('final_loss')}, "
                     f"peak memory {s1.get('peak_memory_gib')} GiB; synth: {json.dumps(r.get('synth'))}")
    lines += [f"- device: {r.get('device')}", "", "```bash", *r.get("commands", {}).values(), "```"]
    if r.get("errors"):
        lines += ["", "Errors:", *[f"- {e}" for e in r["errors"]]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        check_data_dir(a.data_dir)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return Recipe(a).main()


if __name__ == "__main__":
    sys.exit(main())
