"""Where a from-scratch stage-1 step of the `small` preset spends its time (issue 13: the small model is bound by
per-step cost, not by its FLOPs).

The step is the recipe's stage 1: rank-64 LoRA on every linear of the random LM and ViT, embed_tokens trained
whole, packed rows of LaTeX_OCR print, no recompute. For each token budget: median synced step time of
`SftRun.train_step` on pre-built batches; the data loader alone (batches a second from `micro_batches()` with
--workers processes); one profiled step: GPU kernel time against wall time, kernel launches, the top
operators by CPU time and by GPU time.

    python bench/learning/profile_stage1.py --data .carry/latex/print/train.parquet --out $OUT/profile_stage1.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_sft as bs  # noqa: E402

STAGE1 = dict(lora_rank=64, lora_alpha=128, min_pixels=30000, freeze_vit=False, augment=False,
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                              "qkv", "proj", "fc1", "fc2"], modules_to_save=["embed_tokens"])


def make_run(a, tokens: int, overrides: dict):
    class A:  # what bench_sft.make_ocrtune_run reads
        pass
    b = A()
    b.model_dir, b.data, b.rows, b.batch, b.liger = a.model_dir, a.data, a.rows, 32, a.liger
    b.no_gc, b.lora_dropout, b.max_pixels, b.workers = True, 0.0, 120000, a.workers
    return bs.make_ocrtune_run(b, 10**6, tokens, {**STAGE1, **overrides})


def small_stage1_run(data: str, workers: int, tokens: int = 65536, overrides: dict | None = None):
    """`make_run` for the small preset (built into the cache first where missing) on `data`'s 13,918 print train rows:
    the run the loader benchmarks measure (`loader_shared_memory.py`, `loader_pixels.py`, `fed_pixels.py`)."""
    import types

    from ocrtune.models.presets import build_preset, preset_path
    model_dir = preset_path("small")
    if not model_dir.exists():
        build_preset("small", model_dir)
    a = types.SimpleNamespace(model_dir=str(model_dir), data=data, rows=13918, liger=False, workers=workers)
    return make_run(a, tokens, overrides or {})


def alternate(ways: dict, rounds: int, install, measure) -> dict:
    """{name: [`measure(name)` of each round]}: `ways` ({name: function}) installed in turn with `install(function)`
    (a function the loader's workers fork with, patched), `rounds` times; the first one installed again at the end."""
    results = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            install(fn)
            results[name].append(measure(name))
            print(name, results[name][-1], flush=True)
    install(next(iter(ways.values())))
    return results


def record(**fields) -> dict:
    """A benchmark's JSON: the command that made it, the machine, the date, then `fields`."""
    import os
    import platform

    import torch
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return {"command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}{gpu}", **fields}


def compile_blocks(run, which="all") -> int:
    """torch.compile the decoder layers and ViT blocks in place: `which` "all" is `ocrtune sft --torch_compile`
    (`blocks.compile_blocks`); "lm" or "vit" compiles one tower's blocks only."""
    from ocrtune.models.patches import blocks, common
    if which == "all":
        return blocks.compile_blocks(run.loss_module)
    m = common.causal_lm(run.accelerator.unwrap_model(run.loss_module).model).model
    chosen = list(m.language_model.layers) if which == "lm" else list(m.visual.blocks)
    for blk in chosen:
        blk.compile(dynamic=True)
    return len(chosen)


def step_times(run, batches, warmup: int) -> list[float]:
    out = []
    for batch in batches:
        bs._sync()
        t = time.perf_counter()
        run.train_step([batch])
        bs._sync()
        out.append(time.perf_counter() - t)
    return out[warmup:]


def profile_step(run, batch) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    bs._sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        run.train_step([batch])
        bs._sync()
        wall = time.perf_counter() - t
    ev = prof.key_averages()
    cuda_attr = "device_time_total" if hasattr(ev[0], "device_time_total") else "cuda_time_total"
    self_cuda = "self_device_time_total" if hasattr(ev[0], "self_device_time_total") else "self_cuda_time_total"
    kernels_us = sum(getattr(e, self_cuda) for e in ev)
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    syncs = sum(e.count for e in ev if "Synchronize" in e.key or e.key == "cudaStreamSynchronize")
    top_cpu = [(e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)) for e in
               sorted(ev, key=lambda e: -e.self_cpu_time_total)[:30]]
    top_gpu = [(e.key[:90], e.count, round(getattr(e, self_cuda) / 1e3, 2)) for e in
               sorted(ev, key=lambda e: -getattr(e, self_cuda))[:30]]
    del torch, cuda_attr
    return {"wall_ms": round(wall * 1e3, 1), "gpu_kernel_ms": round(kernels_us / 1e3, 1), "kernel_launches": launches,
            "syncs": syncs, "ops": sum(e.count for e in ev), "top_self_cpu_ms": top_cpu, "top_self_gpu_ms": top_gpu}


def loader_rate(run, n: int, skip: int = 3) -> dict:
    """Batches a second from the run's own loader, after `skip` (with `skip` beyond the prefetched batches,
    4 per worker, the workers' steady rate)."""
    stream = run.micro_batches()
    for _ in range(skip):
        next(stream)
    t = time.perf_counter()
    samples = 0
    for _ in range(n):
        samples += len(next(stream)[-1]["cu_seq_lens"]) - 1
    s = time.perf_counter() - t
    return {"batches_per_s": round(n / s, 2), "samples_per_s": round(samples / s, 1)}


def fed_step_rate(run, n: int, skip: int) -> dict:
    """Seconds a step of `train_step` fed by the run's loader (what a training run sees), over `n` steps after `skip`."""
    stream = run.micro_batches()
    for i in range(skip + n):
        if i == skip:
            bs._sync()
            t = time.perf_counter()
        run.train_step([next(stream)[-1]])
    bs._sync()
    return {"fed_step_s": round((time.perf_counter() - t) / n, 4)}


def loader_only(a) -> dict:
    """The loader alone with the pixel values as float32 and in the vision tower's dtype, then steps fed by it.
    (Written before the workers encoded 8 bits: since then every case's workers encode 8 bits and the collator
    restores them, normalized, in the case's form; `loader_pixels.py` compares 8 bits with the bf16 frame.)"""
    tokens = int(a.tokens.split(",")[-1])
    run = make_run(a, tokens, {})
    out = {"tokens": tokens, "workers": a.workers, "pixel_dtype": str(run.collator.pixel_dtype)}
    half, frames = run.collator.pixel_dtype, run.collator.frames
    # float32: as before 2026-12-02; half: bf16 pixels; light: bf16 and one frame of each still image (the default)
    cases = (("float32", None, None), ("half", half, None), ("light", half, frames))
    for (name, dtype, fr), (kind, fn) in ((c, k) for k in (("loader", loader_rate), ("fed", fed_step_rate)) for c in cases):
        run.collator.pixel_dtype, run.collator.frames = dtype, fr
        key = f"{kind}_{name}_pixels"
        out[key] = fn(run, 40, skip=8)
        print(key, json.dumps(out[key]), flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=".carry/latex/print/train.parquet")
    p.add_argument("--model", default="small")
    p.add_argument("--model_root", default="/tmp")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--tokens", default="16384,32768,65536")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--liger", action="store_true")
    p.add_argument("--profile_variants", default="stage1", help="variants whose step is profiled (torch.profiler)")
    p.add_argument("--profile_tokens", default="32768", help="the token budget at which they are profiled")
    p.add_argument("--variants", default="{}", help='JSON {"name": {SftArgs overrides}}, each timed at every budget; '
                   '"_host_vision_ids": false in a variant builds the ViT position ids on the device (the stock way); '
                   '"_compile_blocks": true compiles the decoder layers and ViT blocks (raise --warmup: it compiles '
                   'again for new shapes)')
    p.add_argument("--fed_steps", type=int, default=0, help="also time this many steps fed by the run's loader")
    p.add_argument("--skip_stage1", action="store_true", help="leave out the plain stage-1 variant")
    p.add_argument("--loader_only", action="store_true", help="only the loader's rate (float32 / half pixels) and "
                   "steps fed by it, at the last of --tokens")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    from ocrtune.models.presets import build_preset, preset_path
    a.model_dir = str(preset_path(a.model))
    if not Path(a.model_dir).exists():
        build_preset(a.model, Path(a.model_dir))
    if a.loader_only:
        Path(a.out).write_text(json.dumps({"args": vars(a), "loader_only": loader_only(a)}, indent=1))
        return
    variants = {**({} if a.skip_stage1 else {"stage1": {}}), **json.loads(a.variants)}
    res = {"args": vars(a), "cases": []}
    from ocrtune.models.patches import PatchOptions, prepare
    for name, ov in variants.items():
        ov = dict(ov)
        # "_host_vision_ids": false builds the ViT's position ids image by image on the device (transformers' way)
        host_ids = bool(ov.pop("_host_vision_ids", True))
        compiled = ov.pop("_compile_blocks", False)  # true (all), "lm" or "vit"
        for tokens in [int(x) for x in a.tokens.split(",")]:
            case = {"variant": name, "tokens": tokens, "host_vision_ids": host_ids}
            try:
                run = make_run(a, tokens, ov)
                prepare(run.model, PatchOptions(patch_embed=False, host_vision_ids=host_ids))
                if compiled:
                    case["compiled_blocks"] = compile_blocks(run, "all" if compiled is True else compiled)
                stream = run.micro_batches()
                batches = [next(stream)[-1] for _ in range(a.steps + a.warmup + 1)]
                bs._reset_mem()
                t0 = time.perf_counter()
                ts = step_times(run, batches[:-1], a.warmup)
                case["warmup_s"] = round(time.perf_counter() - t0 - sum(ts), 2)  # compiling, when compiled
                case["steps_s"] = [round(t, 4) for t in ts]  # a compiled step slower than the rest compiled again
                stats = bs._batch_stats(batches[-1])
                case.update(step_s=round(statistics.median(ts), 4), samples_per_step=stats["samples"],
                            samples_per_s=round(stats["samples"] / statistics.median(ts), 1), **bs._mem())
                if a.fed_steps:  # fed by the run's loader, as in training (after the compiling above)
                    case.update(fed_step_rate(run, a.fed_steps, skip=3))
                if name in a.profile_variants.split(",") and tokens == int(a.profile_tokens):
                    case["profile"] = profile_step(run, batches[-1])
                    case["loader"] = loader_rate(run, 30)
            except Exception as e:  # one failing case must not lose the others
                case["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(json.dumps({k: v for k, v in case.items() if k != "profile"}), flush=True)
            res["cases"].append(case)
            Path(a.out).write_text(json.dumps(res, indent=1))
            run = None
            import gc
            gc.collect()
    for c in res["cases"]:
        if "profile" in c:
            pr = c["profile"]
            print({k: v for k, v in pr.items() if not k.startswith("top")})
            for row in pr["top_self_cpu_ms"]:
                print("cpu", row)
            for row in pr["top_self_gpu_ms"]:
                print("gpu", row)


if __name__ == "__main__":
    main()
