"""Stage-1 variants of the from-scratch recipe side by side, one after another on the same GPU(s) and the same
synthetic rows: which setting learns to read print fastest? Issue 13's run 11 ended short of training (validation
still rising, train and validation accuracy close), so the question is learning per second.

Each variant is the recipe's stage 1 (`examples/latex_ocr_from_scratch.py`: `Recipe.stage1_args`) with some recipe
flags changed and its own cosine schedule of `steps`, stopped by `--max_time` if it runs long. Reported per variant:
steps run, seconds a step, the last train loss / token accuracy and print validation loss / teacher-forced token
accuracy at each evaluation (200 rows), as the recipe's `summarize_run` reads them from its `logging.jsonl`.

    python bench/learning/sweep_stage1.py --data_dir .carry/latex --synth_rows 120000 --steps 400 \\
        --variants '{"base": [], "r128_lr5e-4": ["--stage1_lora_rank", "128", "--learning_rate", "5e-4"]}' \\
        --out $OUT/sweep_stage1.json
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VARIANTS = {
    "base": [],  # the recipe's stage 1: rank-64 LoRA over the random weights, embeddings trained, lr 1e-3
    "r128_lr5e-4": ["--stage1_lora_rank", "128", "--learning_rate", "5e-4"],  # twice the rank, half the rate
    "r64_lr2e-3": ["--learning_rate", "2e-3"],
}


def recipe_module():
    spec = importlib.util.spec_from_file_location("latex_ocr_from_scratch", ROOT / "examples" / "latex_ocr_from_scratch.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def variant_args(mod, base: list[str], flags: list[str], steps: int, data: list[str], out: Path) -> list[str]:
    """`ocrtune sft` arguments of one variant: the recipe's stage 1 with `flags` (recipe flags) over `base`; a
    variant's own `--stage1_steps` replaces `steps` (to compare at equal time variants whose steps cost differently).
    Variants run a fixed number of steps, so the recipe's stage 1 is taken by steps (its cosine over them)."""
    recipe = mod.Recipe(mod.parse_args([*base, "--schedule_by", "steps", *flags]))
    return recipe.stage1_args(recipe.a.stage1_steps or steps, data, out)


def summarize(mod, run: Path, seconds: float) -> dict:
    """The recipe's own summary of a run (`summarize_run`: steps, final loss / token accuracy, the train and
    evaluation logs), with the variant's wall time, start-up included."""
    out = {"seconds": round(seconds, 1), **mod.summarize_run(run)}
    out["seconds_per_step_incl_startup"] = round(seconds / out["steps"], 4) if out.get("steps") else None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data_dir", required=True)
    p.add_argument("--work_dir", default=str(ROOT / ".work" / "sweep_stage1"))
    p.add_argument("--synth_rows", type=int, default=120000)
    p.add_argument("--steps", type=int, default=400, help="each variant's planned steps (its cosine schedule)")
    p.add_argument("--max_time", type=float, default=150.0, help="each variant's --max_time (seconds)")
    p.add_argument("--variants", default=None, help="JSON {name: [recipe flags]} (default: %s)" % json.dumps(DEFAULT_VARIANTS))
    p.add_argument("--recipe_flags", default="", help="recipe flags for every variant, as one string after '=', e.g. --recipe_flags=--smoke (a CPU check)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    mod = recipe_module()
    work = Path(a.work_dir).resolve()
    base = ["--phase", "train", "--data_dir", a.data_dir, "--work_dir", str(work), "--report_dir", str(work / "report"),
            "--synth_rows", str(a.synth_rows), *a.recipe_flags.split()]
    variants = json.loads(a.variants) if a.variants else DEFAULT_VARIANTS
    recipe = mod.Recipe(mod.parse_args(base))
    if recipe.wait(recipe.synth(), timeout=600) != 0:
        raise SystemExit(f"error: ocrtune synth failed: see {work / 'synth.log'}")
    data = [str(work / "synth"), recipe.path("print", "train")]
    res = {"command": " ".join(sys.argv), "device": mod.device_name(recipe.gpus), "synth_seconds":
           recipe.report["timings_s"].get("synth"), "steps": a.steps, "variants": {}}
    for name, flags in variants.items():
        run = work / name
        args = variant_args(mod, base, flags, a.steps, data, run)
        args += ["--max_time", str(a.max_time)]
        t = time.time()
        rc = recipe.run(name, args, timeout=a.max_time + 120, gpus=recipe.gpus)
        res["variants"][name] = {"flags": flags, "rc": rc, "command": recipe.report["commands"][name],
                                 **summarize(mod, run, time.time() - t)}
        print(name, json.dumps({k: v for k, v in res["variants"][name].items() if k not in ("command", "train_log")}),
              flush=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
