"""The loader's rate with batches joined into shared memory in the workers (`ocrtune.data.packing.shared_cat`, the
default) against a plain `torch.cat` (the batch then copied into shared memory when pickled for the main process):
the small preset's stage-1 batches (65,536 tokens, print train rows), `--workers` loader workers, the two ways
alternated `--rounds` times, batches a second over `--batches` after `--skip`.

    python bench/learning/loader_shared_memory.py --out bench/learning/loader_shared_memory_dev2cpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "learning"))

import profile_stage1 as ps  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / ".carry/latex/print/train.parquet"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import ocrtune.data.packing as packing
    run = ps.small_stage1_run(a.data, a.workers)
    run.collator.pixel_dtype = torch.bfloat16  # what the GPU run sends (the CPU run's vision dtype is float32)
    ways = {"shared_memory": packing.shared_cat,
            "plain_cat": lambda ts, dtype=None: torch.cat(ts).to(dtype or ts[0].dtype)}

    def install(fn):
        packing.shared_cat = fn  # the workers fork after this, so they see it
    rates = ps.alternate(ways, a.rounds, install,
                         lambda name: ps.loader_rate(run, a.batches, skip=a.skip)["batches_per_s"])
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = ps.record(workers=a.workers, tokens=65536, batches_per_s=rates, median_batches_per_s=med,
                    ratio_shared_over_plain=round(med["shared_memory"] / med["plain_cat"], 2))
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
