"""Recipe flags for run 15 from `profile_stage1.py`'s fed steps (bench/next_gpu_calls.sh X): stage 1 with
`--torch_compile` where its loader-fed step beats the eager one by 10% or more, paced by that step and with the
compile seconds measured (cold: the first process; warm: a second one, inductor's caches filled, else 0.6 x cold);
else eager at the eager pace. Prints the flags on one line.

    python bench/learning/compile_decision.py profile_compile_fed_h200.json [profile_compile_warm_h200.json]
"""
from __future__ import annotations

import json
import sys


def cases(path: str) -> dict:
    try:
        return {c["variant"]: c for c in json.load(open(path))["cases"] if "error" not in c}
    except (OSError, ValueError, KeyError):
        return {}


def decide(fed: dict, warm: dict) -> list[str]:
    eager, compiled, again = fed.get("stage1"), fed.get("compiled"), warm.get("compiled_warm")
    if eager is None or "fed_step_s" not in eager:
        return []  # nothing measured: the recipe's defaults (its probe)
    if compiled is None or "fed_step_s" not in compiled or compiled["fed_step_s"] > 0.9 * eager["fed_step_s"]:
        return ["--stage1_torch_compile", "false", "--stage1_seconds_per_step", f"{eager['fed_step_s']:.4f}"]
    cold = compiled["warmup_s"] - eager["warmup_s"]  # the eager warm-up steps' own time is in both
    hot = again["warmup_s"] - eager["warmup_s"] if again else 0.6 * cold  # unmeasured: the caches save little
    return ["--stage1_torch_compile", "true", "--stage1_seconds_per_step", f"{compiled['fed_step_s']:.4f}",
            "--stage1_compile_seconds", f"{max(cold, 10) * 1.1:.0f}", f"{max(hot, 10) * 1.2:.0f}"]


if __name__ == "__main__":
    print(" ".join(decide(cases(sys.argv[1]), cases(sys.argv[2]) if len(sys.argv) > 2 else {})))
