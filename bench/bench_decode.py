"""Decoding speed: plain transformers `generate`, ocrtune's dynamic greedy loop and its static-KV-cache
decoder (CUDA graphs on CUDA), one process, same rows, same model; greedy answers compared row by row.

Two timings, each path in the model's dtype (bf16 on CUDA), the three paths on the same rows:
  model_only  the prompts encoded beforehand, ONE left-padded batch of --batch_size rows (the engine's
              `_batch`, the same tensors for all three): `model.generate(do_sample=False)`,
              `InferEngine(decode="dynamic").generate_answers`, `InferEngine(decode="static")...`: decoding alone.
  end_to_end  from the raw rows (image decode and preprocessing timed): plain generate over processor-built
              batches in row order (bench_infer's baseline) against `InferEngine.answer_rows` with each decoder.
Between the two (it matters more than end_to_end), the exactness check: the model cast to float32, the first
--fp32_rows rows as one batch through plain generate, the dynamic loop, the static decoder with CUDA graphs and
without them (on the CPU both static runs are eager): `fp32.*.identical_outputs` must be true (token identity with generate), and
`fp32.static_graph_vs_eager` too (the replayed graph computes what the eager step computes).
`static.decoding` is "static-graph" when the graphs ran ("static": eager; else the reason is in
`static_reason`). peak_gib: torch.cuda.max_memory_allocated over the run (CUDA only).

The rows are the package's bundled sample (ocrtune/data/sample/train.parquet: 288 real LaTeX formula images,
the first --rows taken, repeated if more are asked). `--model 2b|7b` builds the preset's config and tokenizer
and random weights on the device; random weights never stop early, so every row runs to --max_new_tokens.
Nothing here imports peft or datasets (`--forbid`, on by default, makes such an import fail).

    python bench/bench_decode.py --model 2b --rows 256 --batch_size 256 --max_new_tokens 64 --fp32_rows 64 \
        --memory_batches 30 --out bench/results/decode_2b_h100.json          # one H100, < 100 s
    python bench/bench_decode.py --model tiny --rows 12 --batch_size 6 --max_new_tokens 6 --fp32_rows 6 \
        --out /tmp/d.json                                 # CPU smoke (the static decoder runs eagerly there)
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_infer  # noqa: E402  (its model loading, rows and plain-generate baseline)


class _Forbidden(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes `import <name>` fail for the given top-level packages (the GPU machine lacks them)."""

    def __init__(self, names: set[str]):
        self.names = names

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        raise ImportError(f"bench_decode must not import {spec.name} (the GPU machine has no such package)")

    def exec_module(self, module):  # never reached
        raise ImportError(module.__name__)


def forbid(names: set[str]):
    """Install the blocker (and hide already imported copies); returns a function that undoes both."""
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] in names}
    finder = _Forbidden(names)
    sys.meta_path.insert(0, finder)

    def undo():
        sys.meta_path.remove(finder)
        sys.modules.update(hidden)
    return undo


def rows_of(path: Path, n: int) -> list[dict]:
    base = bench_infer.read_rows(str(path), n)
    return [base[i % len(base)] for i in range(n)]


def summary(answers: list, seconds: float) -> dict:
    tokens = sum(a.tokens for a in answers)
    return {"seconds": round(seconds, 3), "samples_per_s": round(len(answers) / seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "generated_tokens": tokens}


def measure(device, fn) -> tuple:
    """(result, seconds, peak GiB) of fn()."""
    import torch
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out, t = bench_infer.timed(device, fn)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
    return out, t, peak


def plain_generate(engine, encoded: list[dict], max_new_tokens: int) -> list:
    """model.generate over the engine's left-padded batch of `encoded` (the same tensors the engine decodes)."""
    import torch
    batch = engine._batch(encoded)
    with torch.no_grad(), bench_infer.stock_forwards(engine.model):
        out = engine.model.generate(**batch, **engine._gen_kwargs(max_new_tokens))
    return [engine._answer(t) for t in out[:, batch["input_ids"].shape[1]:]]


def engines(model, processor, template, a) -> dict:
    from ocrtune.models.generate import InferEngine
    kw = dict(workers=a.workers, check_every=a.check_every)
    return {"dynamic": InferEngine(model, processor, template, decode="dynamic", **kw),
            "static": InferEngine(model, processor, template, decode="static", **kw)}


def path_info(engine, before: dict) -> dict:
    return {"decoding": engine.last_path, "static_reason": engine.static_reason(),
            "stats": {k: engine.stats[k] - before.get(k, 0) for k in engine.stats}}


def warm_then_measure(device, fn) -> tuple:
    """(result, seconds, peak GiB, cold seconds): fn run once untimed-for-the-ratio (the batch's first allocations,
    kernel choices and graph captures at this shape), then timed; 2026-12-07's run timed plain generate cold and
    the other paths warm, which made its model-only ratio 4.6x where end to end, all warm, measured 1.5x."""
    _, cold, _ = measure(device, fn)
    out, t, peak = measure(device, fn)
    return out, t, peak, round(cold, 3)


def model_only(a, eng: dict, encoded: list[dict], device) -> dict:
    res = {}
    base, t, peak, cold = warm_then_measure(device, lambda: plain_generate(eng["dynamic"], encoded, a.max_new_tokens))
    res["generate"] = {**summary(base, t), "peak_gib": peak, "cold_seconds": cold}
    print(f"model only, plain generate: {res['generate']}", flush=True)
    for name, engine in eng.items():
        before = dict(engine.stats)
        got, t, peak, cold = warm_then_measure(device, lambda: engine.generate_answers(encoded, a.max_new_tokens))
        res[name] = {**summary(got, t), "peak_gib": peak, "cold_seconds": cold, **path_info(engine, before),
                     **bench_infer.compare(base, got)}
        res[f"{name}_ratio_vs_generate"] = round(res["generate"]["seconds"] / t, 3)
        print(f"model only, {name}: {res[name]}", flush=True)
        res[f"_{name}"] = got
    res["static_vs_dynamic"] = bench_infer.compare(res.pop("_dynamic"), res.pop("_static"))
    res["static_speed_vs_dynamic"] = round(res["dynamic"]["seconds"] / res["static"]["seconds"], 3)
    return res


def end_to_end(a, eng: dict, rows: list[dict], device) -> dict:
    res = {}
    (base, _), t, peak = measure(device, lambda: bench_infer.baseline(eng["dynamic"], rows, a.batch_size,
                                                                      a.max_new_tokens))
    res["generate"] = {**summary(base, t), "peak_gib": peak}
    print(f"end to end, plain generate: {res['generate']}", flush=True)
    for name, engine in eng.items():
        before = dict(engine.stats)
        got, t, peak = measure(device, lambda: engine.answer_rows(rows, a.batch_size, a.max_new_tokens))
        res[name] = {**summary(got, t), "peak_gib": peak, **path_info(engine, before),
                     **bench_infer.compare(base, got)}
        res[f"{name}_ratio_vs_generate"] = round(res["generate"]["seconds"] / t, 3)
        print(f"end to end, {name}: {res[name]}", flush=True)
    res["static_speed_vs_dynamic"] = round(res["dynamic"]["seconds"] / res["static"]["seconds"], 3)
    return res


def fp32(a, model, processor, template, encoded: list[dict], device) -> dict:
    """Token identity in float32 on one batch: generate, dynamic loop, static with and without graphs."""
    import torch

    from ocrtune.models.generate import InferEngine
    dtypes = bench_infer.tensor_dtypes(model)
    tf32 = bench_infer.no_tf32()
    try:
        model.float()
        kw = dict(workers=0, check_every=a.check_every)
        dyn = InferEngine(model, processor, template, decode="dynamic", **kw)
        graph = InferEngine(model, processor, template, decode="static", **kw)
        eager = InferEngine(model, processor, template, decode="static", cuda_graphs=False, **kw)
        base, tb, _ = measure(device, lambda: plain_generate(dyn, encoded, a.max_new_tokens))
        res = {"rows": len(encoded), "generate_seconds": round(tb, 3)}
        outs = {}
        for name, engine in (("dynamic", dyn), ("static", graph), ("static_eager", eager)):
            got, t, _ = measure(device, lambda: engine.generate_answers(encoded, a.max_new_tokens))
            outs[name] = got
            res[name] = {"seconds": round(t, 3), "decoding": engine.last_path, "static_reason": engine.static_reason(),
                         **bench_infer.compare(base, got)}
        res["static_graph_vs_eager"] = bench_infer.compare(outs["static_eager"], outs["static"])
        return res
    except Exception as e:  # report, keep the bf16 results
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    finally:
        bench_infer.no_tf32(tf32)
        bench_infer.restore_dtypes(model, dtypes)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def memory_over_batches(engine, encoded: list[dict], n: int, max_new_tokens: int, device) -> dict:
    """`n` static batches of changing shapes (rows and max_new_tokens), each capturing its own graph: the memory
    allocated after each (MiB) must stay flat, or graphs, their pools or caches outlive their batch (`serve` decodes
    for days). CUDA only: on the CPU nothing is captured and the figures are None."""
    import torch
    allocated, reserved = [], []
    before = dict(engine.stats)
    for i in range(n):
        engine.generate_answers(encoded[:1 + i % len(encoded)], 2 + (max_new_tokens + i) % max(max_new_tokens, 2))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            allocated.append(round(torch.cuda.memory_allocated(device) / 2**20, 1))
            reserved.append(round(torch.cuda.memory_reserved(device) / 2**20, 1))
    graphs = engine.stats["graph_replays"] - before.get("graph_replays", 0)
    return {"batches": n, "decoding": engine.last_path, "graph_replays": graphs,
            "allocated_mib": allocated or None, "reserved_mib_max": max(reserved) if reserved else None,
            "allocated_growth_mib": round(allocated[-1] - allocated[min(2, len(allocated) - 1)], 1) if allocated else None}


def profile(a, eng: dict, encoded: list[dict], device) -> dict:
    """Host-side cost of one batch of `--profile_rows` rows, plain generate against the dynamic loop and the static
    decoder, each warm: wall seconds, decoding steps, kernel launches and the operators taking most host time
    (torch.profiler). Where the model's work is small (the reader), the host's time a step decides the speed."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    batch = encoded[:a.profile_rows]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    res = {"rows": len(batch)}
    paths = (("generate", lambda: plain_generate(eng["dynamic"], batch, a.max_new_tokens)),
             ("dynamic", lambda: eng["dynamic"].generate_answers(batch, a.max_new_tokens)),
             ("static", lambda: eng["static"].generate_answers(batch, a.max_new_tokens)))
    for name, fn in paths:
        fn()  # warm: allocations, kernel choices, graph capture at this shape
        with torch_profile(activities=acts) as prof:
            got, t, _ = measure(device, fn)
        events = prof.key_averages()
        steps = max(x.tokens for x in got)
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
        ops = sum(e.count for e in events if e.key.startswith("aten::"))
        res[name] = {"seconds": round(t, 3), "steps": steps, "ms_per_step": round(1000 * t / max(steps, 1), 2),
                     "aten_ops_per_step": round(ops / max(steps, 1), 1),
                     "kernel_launches": launches, "launches_per_step": round(launches / max(steps, 1), 1),
                     "top_host_ops": [[e.key, e.count, round(e.self_cpu_time_total / 1000, 1)] for e in top]}
        print(f"profile {name}: {t:.3f}s, {steps} steps, {launches} launches", flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="2b", help="2b, 7b (random weights on the device), tiny, small, or a folder")
    p.add_argument("--data", default="ocrtune/data/sample/train.parquet", help="parquet of (image, text) rows")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--fp32_rows", type=int, default=64, help="float32 identity check on this many rows (0: off)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--attn", default="sdpa", help="attention of the 2b/7b random models")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max_pixels", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="engine's encoding threads (default: cores, at most 8)")
    p.add_argument("--check_every", type=int, default=4)
    p.add_argument("--skip_end_to_end", action="store_true", help="time the model-only batch alone")
    p.add_argument("--memory_batches", type=int, default=0, help="static batches of changing shapes after the "
                   "timings, memory allocated after each (CUDA: must stay flat; 0: off)")
    p.add_argument("--profile_rows", type=int, default=0, help="profile one batch of this many rows on each path "
                   "(torch.profiler: host time, kernel launches; 0: off)")
    p.add_argument("--budget_s", type=float, default=0, help="skip the parts (fp32, then end_to_end) not yet "
                   "started after this many seconds (0: no limit); skipped parts are named in the JSON")
    p.add_argument("--forbid", default="peft,datasets", help="packages whose import fails here ('' : none)")
    p.add_argument("--model_root", default=None, help="where 2b/7b config folders go (default: $TMPDIR or /tmp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    undo = forbid({n for n in a.forbid.split(",") if n})
    try:
        return _run(a)
    finally:
        undo()


def _run(a) -> dict:
    import os

    import torch
    import transformers
    t_start = time.time()
    a.model_root = a.model_root or os.environ.get("TMPDIR", "/tmp")
    data = Path(a.data)
    data = data if data.exists() or data.is_absolute() else ROOT / a.data
    rows = rows_of(data, a.rows)
    model, processor, template, info = bench_infer.load(a)
    eng = engines(model, processor, template, a)
    device = eng["static"].device
    res = {"command": " ".join(shlex.quote(x) for x in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
           "model": info, "data": str(a.data), "rows": len(rows), "batch_size": a.batch_size,
           "max_new_tokens": a.max_new_tokens, "greedy": True, "check_every": a.check_every,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__, "skipped": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        res["wall_s"] = round(time.time() - t_start, 1)
        out.write_text(json.dumps(res, indent=1) + "\n")

    def in_budget(part: str) -> bool:
        if a.budget_s and time.time() - t_start > a.budget_s:
            res["skipped"].append(part)
            return False
        return True

    print(f"loaded in {time.time() - t_start:.1f}s: {info}", flush=True)
    warm = rows[:min(8, len(rows))]  # CUDA context, kernels, thread pool, cuBLAS handles on the capture stream
    for engine in eng.values():
        engine.answer_rows(warm, len(warm), 3)
    bench_infer.baseline(eng["dynamic"], warm, len(warm), 2)
    encoded = eng["static"]._encode_all(rows[:a.batch_size])
    res["model_only"] = model_only(a, eng, encoded, device)
    res["model_only_speedup"] = res["model_only"]["static_ratio_vs_generate"]
    save()
    if a.fp32_rows > 0 and in_budget("fp32"):
        res["fp32"] = fp32(a, model, processor, template, encoded[:a.fp32_rows], device)
        print(f"float32 check: {res['fp32']}", flush=True)
        f = res["fp32"]
        res["fp32_identical"] = bool(f.get("static", {}).get("identical_outputs")) and bool(
            f.get("dynamic", {}).get("identical_outputs")) and bool(f.get("static_graph_vs_eager", {}).get(
                "identical_outputs"))
        save()
    if not a.skip_end_to_end and in_budget("end_to_end"):
        res["end_to_end"] = end_to_end(a, eng, rows, device)
        res["end_to_end_speedup"] = res["end_to_end"]["static_ratio_vs_generate"]
        save()
    if a.memory_batches > 0 and in_budget("memory_batches"):
        res["memory_batches"] = memory_over_batches(eng["static"], encoded, a.memory_batches, a.max_new_tokens, device)
        print(f"memory over static batches: {res['memory_batches']}", flush=True)
        save()
    if a.profile_rows > 0 and in_budget("profile"):
        res["profile"] = profile(a, eng, eng["static"]._encode_all(rows[:a.profile_rows]), device)
        save()
    for engine in eng.values():
        engine.close()
    save()
    print(f"static vs plain generate: model only {res['model_only_speedup']}x, end to end "
          f"{res.get('end_to_end_speedup')}x; float32 identical: {res.get('fp32_identical')}; wrote {out}", flush=True)
    return res


if __name__ == "__main__":
    main()
