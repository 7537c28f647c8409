"""The loader's rate with batches joined into shared memory in the workers (`ocrtune.data.packing.shared_cat`, the
default) against a plain `torch.cat` (the batch then copied into shared memory when pickled for the main process):
the small preset's stage-1 batches (65,536 tokens, print train rows), `--workers` loader workers, the two ways
alternated `--rounds` times, batches a second over `--batches` after `--skip`.

    python bench/learning/loader_shared_memory.py --out bench/learning/loader_shared_memory_dev2cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
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
    from ocrtune.models.presets import build_preset, preset_path

    class A:  # what profile_stage1.make_run reads
        model_dir, data, rows, liger, workers = str(preset_path("small")), a.data, 13918, False, a.workers
    if not Path(A.model_dir).exists():
        build_preset("small", Path(A.model_dir))
    run = ps.make_run(A, 65536, {})
    run.collator.pixel_dtype = torch.bfloat16  # what the GPU run sends (the CPU run's vision dtype is float32)
    shared = packing.shared_cat
    ways = {"shared_memory": shared, "plain_cat": lambda ts, dtype=None: torch.cat(ts).to(dtype or ts[0].dtype)}
    rates = {k: [] for k in ways}
    for _ in range(a.rounds):
        for name, fn in ways.items():
            packing.shared_cat = fn  # the workers fork after this, so they see it
            rates[name].append(ps.loader_rate(run, a.batches, skip=a.skip)["batches_per_s"])
            print(name, rates[name][-1], flush=True)
    packing.shared_cat = shared
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "workers": a.workers, "tokens": 65536,
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "batches_per_s": rates, "median_batches_per_s": med,
           "ratio_shared_over_plain": round(med["shared_memory"] / med["plain_cat"], 2)}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
