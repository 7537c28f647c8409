"""The loader's rate with the workers' pixels in 8 bits (the default since 2026-12-03: one frame [N, C, P*P], one
channel for a gray image, normalized on the device by the trainer) against one normalized frame in bf16 (what the
workers sent before): the small preset's stage-1 batches (65,536 tokens, print train rows), `--workers` loader
workers, the two ways alternated `--rounds` times, batches a second over `--batches` after `--skip`. Also the bytes
of a batch's pixels each way.

    python bench/learning/loader_pixels.py --out bench/learning/loader_pixels_dev2cpu.json
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


def _bf16_frame(self, ip, images, frames):
    """The workers' pixels before 8 bits: one frame, normalized by the processor (cast to bf16 by the collator)."""
    out = ip(images=images, return_tensors="pt", temporal_patch_size=1)
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"], "pixel_frames": frames}


def pixel_ways() -> tuple[dict, object]:
    """The two ways of the workers' pixels ({name: `Template._light_pixels`}), and the function that installs one
    (the loader's workers fork after it, so they see it)."""
    from ocrtune.models.template import Template

    def install(fn):
        Template._light_pixels = fn
    return {"eight_bit": Template._light_pixels, "bf16_frame": _bf16_frame}, install


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / ".carry/latex/print/train.parquet"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    run = ps.small_stage1_run(a.data, a.workers)
    run.collator.pixel_dtype = torch.bfloat16  # what the GPU run sends (the CPU run's vision dtype is float32)
    nbytes = {}

    def measure(name):
        rate = ps.loader_rate(run, a.batches, skip=a.skip)["batches_per_s"]
        if name not in nbytes:
            pixels = next(run.micro_batches())[-1]["pixel_values"]
            nbytes[name] = pixels.numel() * pixels.element_size()
        return rate
    ways, install = pixel_ways()
    rates = ps.alternate(ways, a.rounds, install, measure)
    med = {k: statistics.median(v) for k, v in rates.items()}
    out = ps.record(workers=a.workers, tokens=65536, batches_per_s=rates, median_batches_per_s=med,
                    pixel_bytes_first_batch=nbytes,
                    ratio_eight_bit_over_bf16_frame=round(med["eight_bit"] / med["bf16_frame"], 2))
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
