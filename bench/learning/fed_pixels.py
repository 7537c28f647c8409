"""Stage-1 steps fed by the loader with the workers' pixels in 8 bits (the default since 2026-12-03) against one
normalized frame in bf16 (what they sent before), on one machine: the small preset's stage 1 (65,536 tokens, print
train rows, `--workers` loader workers, `ocrtune sft --torch_compile` where `--compile`), compiled once, then the two
ways alternated `--rounds` times, seconds a step over `--steps` after `--skip` (each way starts a fresh loader). Also
the step on pre-built batches (the GPU's own pace, the floor).

    python bench/learning/fed_pixels.py --out $OUT/fed_pixels_h200.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "learning"))

import profile_stage1 as ps  # noqa: E402
from loader_pixels import pixel_ways  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / ".carry/latex/print/train.parquet"))
    p.add_argument("--workers", type=int, default=13)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--compile", default="true", choices=["true", "false"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=15)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    run = ps.small_stage1_run(a.data, a.workers, a.tokens, {"torch_compile": a.compile == "true"})
    out = ps.record(workers=a.workers, tokens=a.tokens, compiled=a.compile == "true")
    t = time.perf_counter()
    ps.fed_step_rate(run, 10, skip=0)  # compiling (the restore of 8-bit pixels runs outside the compiled blocks)
    out["warmup_s"] = round(time.perf_counter() - t, 1)
    stream = run.micro_batches()
    batches = [next(stream)[-1] for _ in range(12)]
    del stream
    out["prebuilt_step_s"] = round(statistics.median(ps.step_times(run, batches, 2)), 4)
    print(json.dumps(out), flush=True)
    ways, install = pixel_ways()
    fed = ps.alternate(ways, a.rounds, install, lambda name: ps.fed_step_rate(run, a.steps, skip=a.skip)["fed_step_s"])
    med = {k: statistics.median(v) for k, v in fed.items()}
    out.update(fed_step_s=fed, median_fed_step_s=med,
               speedup_eight_bit_over_bf16_frame=round(med["bf16_frame"] / med["eight_bit"], 2))
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
