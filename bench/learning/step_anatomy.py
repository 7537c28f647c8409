"""Where a training step's time goes, from one process and one model: the step time at several token budgets (its
slope is the cost of a token, its intercept what a step costs whatever its size), and one profiled step taken apart:
GPU busy time against the step's wall time, the GPU's idle gaps with the host call that launched the kernel after
each, kernel time by phase (forward, backward, optimizer) and by kernel. Batches are packed here from consecutive
rows (as bench_sft.py's probe does), so the loader is timed on its own (`--loader_batches`): batches a second from
the run's own workers against the steps a second the GPU could take.

    python3 bench/learning/step_anatomy.py --data print.parquet --model 7b --liger --tokens 8192,10240,16384 \
        --profile_tokens 10240 --overrides '{"speed": "max"}' --out anatomy.json --trace trace.json.gz
"""
from __future__ import annotations

import argparse
import bisect
import collections
import gzip
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

GAP_US = 20  # idle stretches shorter than this are launch latency, not a missing kernel


def step_times(run, batch, steps: int, warmup: int, sync) -> list[float]:
    out = []
    for i in range(warmup + steps):
        sync()
        t = time.perf_counter()
        run.train_step([batch])
        sync()
        if i >= warmup:
            out.append(time.perf_counter() - t)
    return out


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def enclosing(ops_by_tid: dict, tid, ts: float) -> list[str]:
    """Names of the CPU ops on thread `tid` that contain time `ts`, outermost first."""
    starts, ops = ops_by_tid.get(tid, ([], []))
    chain = [op for op in ops[:bisect.bisect_right(starts, ts)] if op["ts"] + op["dur"] >= ts]
    return [op["name"] for op in chain]


def phase_of(chain: list[str], tid, main_tid) -> str:
    if any("Optimizer.step" in n or "optimizer" in n.lower() for n in chain):
        return "optimizer"
    if tid != main_tid or any("autograd::engine" in n for n in chain):
        return "backward"
    if any("clip_grad" in n or "foreach_norm" in n for n in chain):
        return "grad_norm"
    return "forward"


def analyze(trace: dict, top: int = 25) -> dict:
    """GPU busy time, idle gaps and kernel time by phase and name from a torch.profiler Chrome trace."""
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no GPU events in the trace"}
    cpu = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    launches = {e["args"]["correlation"]: e for e in ev if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    ops_by_tid = {}
    for e in sorted(cpu, key=lambda e: e["ts"]):
        ops_by_tid.setdefault(e["tid"], ([], []))
        ops_by_tid[e["tid"]][0].append(e["ts"])
        ops_by_tid[e["tid"]][1].append(e)
    main_tid = min(ops_by_tid, key=lambda t: ops_by_tid[t][0][0]) if ops_by_tid else None
    gpu.sort(key=lambda e: e["ts"])
    busy = union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(e - s for s, e in busy)

    def launch_chain(e):
        lau = launches.get(e.get("args", {}).get("correlation"))
        return (lau, enclosing(ops_by_tid, lau["tid"], lau["ts"]) if lau else [])

    gaps, by_phase, by_name = [], collections.Counter(), collections.Counter()
    counts = collections.Counter()
    for e in gpu:
        lau, chain = launch_chain(e)
        ph = phase_of(chain, lau["tid"] if lau else None, main_tid) if lau else "unknown"
        by_phase[ph] += e["dur"]
        by_name[e["name"][:90]] += e["dur"]
        counts[e["name"][:90]] += 1
    first_at = {}
    for e in gpu:
        first_at.setdefault(e["ts"], e)
    for (s0, e0), (s1, _) in zip(busy, busy[1:]):
        gap = s1 - e0
        if gap < GAP_US:
            continue
        nxt = first_at.get(s1)
        lau, chain = launch_chain(nxt) if nxt else (None, [])
        gaps.append({"us": round(gap, 1), "at_us": round(e0 - busy[0][0], 1), "next_kernel": nxt["name"][:80] if nxt else "",
                     "launched_us_before_gap_end": round(s1 - lau["ts"], 1) if lau else None,
                     "launch_in": [n[:70] for n in chain[-6:]]})
    by_op = collections.Counter()
    for g in gaps:  # idle time by the op (a level below the step) whose kernel ended it
        by_op[" < ".join(reversed(g["launch_in"][-3:])) or "?"] += g["us"]
    host_first = min((e["ts"] for e in cpu), default=busy[0][0])
    return {"host_ms_before_first_kernel": round((busy[0][0] - host_first) / 1e3, 2), "gpu_span_ms": round(span / 1e3, 2), "gpu_busy_ms": round(busy_us / 1e3, 2),
            "gpu_idle_ms": round((span - busy_us) / 1e3, 2), "gaps_over_%dus" % GAP_US: len(gaps),
            "gap_ms": round(sum(g["us"] for g in gaps) / 1e3, 2), "gpu_events": len(gpu),
            "kernel_ms_by_phase": {k: round(v / 1e3, 2) for k, v in by_phase.most_common()},
            "idle_ms_by_launching_op": {k: round(v / 1e3, 2) for k, v in by_op.most_common(top)},
            "largest_gaps": sorted(gaps, key=lambda g: -g["us"])[:top],
            "top_kernels_ms": [{"name": k, "ms": round(v / 1e3, 2), "calls": counts[k]} for k, v in by_name.most_common(top)]}


def profile_step(run, batch, trace_path: str | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        run.train_step([batch])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    fd, tmp = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    prof.export_chrome_trace(tmp)
    with open(tmp) as f:
        trace = json.load(f)
    os.remove(tmp)
    if trace_path:
        with gzip.open(trace_path, "wt") as f:
            json.dump(trace, f)
    return analyze(trace)


def fed_steps(run, n: int, warmup: int, sync, workers: int, pin: bool, switch: float | None) -> dict:
    """Steps fed by a loader as the run's own (its workers and, with `pin`, the pinning thread busy beside the step,
    as in training), each timed from asking for its batch to the step's end; `switch`: Python's thread switch
    interval meanwhile (a thread waiting for the GIL waits up to this long)."""
    from ocrtune.train.data import make_loader
    old = sys.getswitchinterval()
    if switch:
        sys.setswitchinterval(switch)
    try:
        stream = iter(make_loader(run.train_ds, run.epoch_plan(0), run.collator, workers, pin))
        times, tokens, samples = [], 0, 0
        for i in range(warmup + n):
            sync()
            t = time.perf_counter()
            batch = next(stream)
            run.train_step([batch])
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t)
                tokens += int(batch["input_ids"].numel())
                samples += len(batch["cu_seq_lens"]) - 1 if "cu_seq_lens" in batch else int(batch["input_ids"].shape[0])
    finally:
        sys.setswitchinterval(old)
    return {"workers": workers, "pin": pin, "switch_s": switch or old, "steps": n, "step_s": [round(x, 4) for x in times],
            "median_s": round(sorted(times)[n // 2], 4), "samples_per_s": round(samples / sum(times), 1),
            "tokens_per_s": round(tokens / sum(times))}


def loader_rate(run, n: int) -> dict:
    """Batches a second from the run's own loader (its workers, its token budget), after the first."""
    stream = run.micro_batches()
    next(stream)
    t = time.perf_counter()
    for _ in range(n):
        next(stream)
    dt = time.perf_counter() - t
    return {"batches": n, "seconds": round(dt, 3), "batches_per_s": round(n / dt, 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="7b")
    p.add_argument("--model_root", default="/tmp")
    p.add_argument("--tokens", default="8192,10240,16384", help="token budgets timed (one packed micro-batch a step)")
    p.add_argument("--profile_tokens", type=int, default=10240, help="the run's token budget, and the profiled step's")
    p.add_argument("--no_profile", dest="profile", action="store_false")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--liger", action="store_true")
    p.add_argument("--overrides", default='{"speed": "max"}', help="SftArgs fields (JSON)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--loader_batches", type=int, default=20)
    p.add_argument("--fed_steps", type=int, default=10, help="steps timed with batches from the run's own loader")
    p.add_argument("--fed_variants", default="default",
                   help="';'-separated loader settings for the fed steps: workers=N, pin=true|false, switch=SECONDS")
    p.add_argument("--out", required=True)
    p.add_argument("--trace", help="write the profiled step's Chrome trace here (.json.gz)")
    a = p.parse_args()
    import torch
    import bench_sft
    from ocrtune.compat import default_cuda_allocator
    from ocrtune.data.packing import pack
    default_cuda_allocator()
    model_dir = os.path.join(a.model_root, f"q{a.model}")  # bench_sft's folder for the same preset
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        from ocrtune.models.presets import build_preset
        build_preset(a.model, model_dir)
    budgets = [int(x) for x in a.tokens.split(",")]
    ns = argparse.Namespace(model_dir=model_dir, data=a.data, rows=3000, batch=32, liger=a.liger, no_gc=False,
                            lora_dropout=0.05, max_pixels=1280 * 28 * 28, workers=a.workers)
    overrides = json.loads(a.overrides)
    t0 = time.perf_counter()
    run = bench_sft.make_ocrtune_run(ns, 10**6, a.profile_tokens, overrides)
    setup_s = time.perf_counter() - t0
    ds = run.train_ds
    lengths = ds.lengths()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    report = {"command": "python3 " + " ".join(sys.argv), "model": a.model, "overrides": overrides,
              "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "setup_s": round(setup_s, 1), "effective": {k: getattr(run.args, k) for k in
                                                          ("fp8_base", "lean_mlp_fp8", "lean_mlp", "lora_dropout",
                                                           "gradient_checkpointing", "recompute_layers", "use_liger",
                                                           "torch_compile")},
              "budgets": []}
    batches = {}
    for budget in budgets:
        idx, used, _ = bench_sft.fill_budget(lengths, budget)
        batches[budget] = pack([ds[j] for j in idx], 0)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ts = step_times(run, batches[budget], a.steps, a.warmup, sync)
        med = sorted(ts)[len(ts) // 2]
        row = {"budget": budget, "tokens": used, "samples": len(idx), "step_s": [round(t, 4) for t in ts],
               "median_s": round(med, 4), "samples_per_s": round(len(idx) / med, 1), "tokens_per_s": round(used / med),
               **bench_sft._mem()}
        report["budgets"].append(row)
        print(json.dumps(row), flush=True)
    if len(budgets) > 1:
        xs = [r["tokens"] for r in report["budgets"]]
        a0, b0 = fit_line(xs, [r["median_s"] for r in report["budgets"]])
        per_sample = sum(r["tokens"] for r in report["budgets"]) / sum(r["samples"] for r in report["budgets"])
        report["fit"] = {"fixed_s_per_step": round(a0, 4), "s_per_1k_tokens": round(b0 * 1000, 4),
                         "samples_per_s_without_fixed": round(1 / (b0 * per_sample), 1) if b0 > 0 else None}
        print("fit:", report["fit"], flush=True)
    prof_batch = None if not a.profile else batches.get(a.profile_tokens) or pack([ds[j] for j in bench_sft.fill_budget(lengths, a.profile_tokens)[0]], 0)
    report["profile"] = profile_step(run, prof_batch, a.trace) if a.profile else {}
    pr = report["profile"]
    print({k: pr.get(k) for k in ("host_ms_before_first_kernel", "gpu_span_ms", "gpu_busy_ms", "gpu_idle_ms", "gap_ms", "kernel_ms_by_phase")}, flush=True)
    for k, v in list(pr.get("idle_ms_by_launching_op", {}).items())[:12]:
        print(f"  idle {v:8.2f} ms before a kernel from {k}", flush=True)
    for k in pr.get("top_kernels_ms", [])[:15]:
        print(f"  {k['ms']:8.2f} ms {k['calls']:5d}x {k['name']}", flush=True)
    report["fed"] = []
    for variant in filter(None, a.fed_variants.split(";")) if a.fed_steps else []:
        kv = dict(x.split("=") for x in variant.split(",") if "=" in x)
        r = fed_steps(run, a.fed_steps, 4, sync, int(kv.get("workers", a.workers)), kv.get("pin", "true") == "true",
                      float(kv["switch"]) if "switch" in kv else None)
        report["fed"].append({"variant": variant, **r})
        print("fed by the loader:", report["fed"][-1], flush=True)
    if a.loader_batches:
        report["loader"] = loader_rate(run, a.loader_batches)
        print("loader:", report["loader"], flush=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
