"""The loader's rate with the workers' pixels in 8 bits (the default since 2026-12-03: one frame [N, C, P*P], one
channel for a gray image, normalized on the device by the loss module) against one normalized frame in bf16 (what
the workers sent before): the small preset's stage-1 batches (65,536 tokens, print train rows), `--workers` loader
workers, the two ways alternated `--rounds` times, batches a second over `--batches` after `--skip`. Also the bytes
of a batch's pixels each way.

    python bench/learning/loader_pixels.py --out bench/learning/loader_pixels_dev2cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "learning"))

import profile_stage1 as ps  # noqa: E402


def _bf16_frame(self, ip, images, frames):
    """The workers' pixels before 8 bits: one frame, normalized by the processor (cast to bf16 by the collator)."""
    out = ip(images=images, return_tensors="pt", temporal_patch_size=1)
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"], "pixel_frames": frames}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / ".carry/latex/print/train.parquet"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from ocrtune.models.presets import build_preset, preset_path
    from ocrtune.models.template import Template

    class A:  # what profile_stage1.make_run reads
        model_dir, data, rows, liger, workers = str(preset_path("small")), a.data, 13918, False, a.workers
    if not Path(A.model_dir).exists():
        build_preset("small", Path(A.model_dir))
    run = ps.make_run(A, 65536, {})
    run.collator.pixel_dtype = torch.bfloat16  # what the GPU run sends (the CPU run's vision dtype is float32)
    eight_bit = Template._light_pixels
    ways = {"eight_bit": eight_bit, "bf16_frame": _bf16_frame}
    rates, nbytes = {k: [] for k in ways}, {}
    for _ in range(a.rounds):
        for name, fn in ways.items():
            Template._light_pixels = fn  # the workers fork after this, so they see it
            rates[name].append(ps.loader_rate(run, a.batches, skip=a.skip)["batches_per_s"])
            print(name, rates[name][-1], flush=True)
            if name not in nbytes:
                batch = next(run.micro_batches())[-1]
                nbytes[name] = batch["pixel_values"].numel() * batch["pixel_values"].element_size()
    Template._light_pixels = eight_bit
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "workers": a.workers, "tokens": 65536,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "batches_per_s": rates, "median_batches_per_s": med,
           "pixel_bytes_first_batch": nbytes, "ratio_eight_bit_over_bf16_frame": round(med["eight_bit"] / med["bf16_frame"], 2)}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
