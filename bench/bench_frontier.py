"""Speed against memory: ocrtune LoRA training steps for each token budget x recompute setting, one process.

The model is built once; each setting changes what a user would change with flags:
  --packing_tokens B        tokens per packed step (the budget)
  --recompute_layers K      K of the language model's decoder layers recompute their activations in
                            backward (gradient checkpointing), the others keep them; "all" = every layer
                            (ocrtune's default), 0 = none (--gradient_checkpointing false)
For each (B, K): peak memory is reset (empty_cache + reset_peak_memory_stats), --warmup steps run, then
--steps timed steps (device sync at each step end) on packed batches of consecutive rows of --data.
A setting that runs out of memory is recorded as such. The same fixed-batch loss as bench_sft.py's check is
computed once (eval mode: dropout off); compare it with the baseline's `check_loss` (bench_sft.py --cases a)
run in the same device call. Peak memory is measured in this one process, after the previous settings freed
theirs (empty_cache), so it can differ from a fresh process by allocator fragmentation; the chosen setting
is re-measured in a fresh process by bench_sft.py (--cases b with the same flags) when time allows.

    python bench/bench_frontier.py --model 7b --data .carry/latex/print/train.parquet --liger \
        --grid "16384:all,14,7,0;8192:7,3,0;12288:7,3,0;32768:all,14;65536:all" --out $OUT/frontier_7b.json
    python bench/bench_frontier.py --model tiny --rows 64 --grid "512:all,0;1024:1" --steps 2 --warmup 1 --out /tmp/f.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_sft as bs  # noqa: E402


def parse_grid(text: str) -> list[tuple[int, str]]:
    """'16384:all,14,0;8192:3' -> [(16384, 'all'), (16384, '14'), (16384, '0'), (8192, '3')]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        budget, _, ks = part.partition(":")
        out += [(int(budget), k.strip()) for k in (ks or "all").split(",") if k.strip()]
    return out


def set_recompute(model, k: str) -> int:
    """Gradient checkpointing on the first k decoder layers of the language model ('all': every one)."""
    from ocrtune.train.loss import causal_lm
    layers = list(causal_lm(model).model.language_model.layers)
    n = len(layers) if k == "all" else min(int(k), len(layers))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < n
    return n


def batches_for(ds, lengths, budget: int, start: int, count: int):
    """`count` packed batches of consecutive rows (from `start`, wrapping) filling `budget` tokens each."""
    from ocrtune.data.packing import pack
    out, i = [], start
    for _ in range(count):
        idx, _, i = bs.fill_budget(lengths, budget, i)
        out.append(pack([ds[j] for j in idx], 0))
    return out, i


def measure(run, batches, warmup: int, counts) -> dict:
    import torch
    steps = []
    for n, batch in enumerate(batches):
        bs._sync()
        t = time.perf_counter()
        run.train_step([batch])
        bs._sync()
        steps.append({**bs._batch_stats(batch), "time": time.perf_counter() - t})
        if n == 0 and torch.cuda.is_available():
            print(f"    first step {steps[-1]['time']:.2f}s", flush=True)
    return bs._summarize("frontier", steps, counts, warmup, {})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="7b", help="preset: 7b, 2b (real shapes, random weights), small, tiny")
    p.add_argument("--model_root", default="/tmp")
    p.add_argument("--data", default=".carry/latex/print/train.parquet")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--max_pixels", type=int, default=1280 * 28 * 28)
    p.add_argument("--grid", default="16384:all,14,7,0;8192:7,3,0;32768:all,14;65536:all")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--liger", action="store_true")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--overrides", default="{}", help="JSON of SftArgs overrides for every setting (e.g. fused_lora)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--budget_s", type=float, default=0, help="stop starting new settings after this many seconds")
    p.add_argument("--out", default="bench/results/frontier.json")
    a = p.parse_args(argv)
    t0 = time.time()
    from ocrtune.compat import ALLOCATOR_VARS, default_cuda_allocator
    default_cuda_allocator()  # what `ocrtune sft` runs with (PYTORCH_CUDA_ALLOC_CONF= for the plain allocator)
    import torch

    from ocrtune.models.presets import build_preset, ensure_preset
    from ocrtune.models.patches.liger import liger_unavailable_reason
    if a.model in ("2b", "7b"):
        model_dir = Path(a.model_root) / f"q{a.model}"
        if not (model_dir / "config.json").exists():
            build_preset(a.model, model_dir)
    else:
        model_dir = ensure_preset(a.model)
    ns = argparse.Namespace(model_dir=str(model_dir), data=a.data, rows=a.rows, batch=32, liger=a.liger, no_gc=False,
                            lora_dropout=a.lora_dropout, max_pixels=a.max_pixels, workers=a.workers)
    run = bs.make_ocrtune_run(ns, overrides=json.loads(a.overrides))
    ds, lengths = run.train_ds, run.train_ds.lengths()
    counts = bs._flop_counts(run.model)
    fixed = [ds[i] for i in range(bs.CHECK_ROWS)]
    from ocrtune.data.packing import pack
    run.loss_module.eval()
    with torch.no_grad(), run.accelerator.autocast():
        b = {k: v.to(run.accelerator.device) for k, v in pack(fixed, 0).items()}
        l, n, _ = run.loss_module(**b)
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model": a.model, "data": a.data, "rows": len(lengths),
           "liger": bool(run.args.use_liger), "liger_applied": bool(run.args.use_liger) and liger_unavailable_reason() is None,
           "lora_dropout": a.lora_dropout, "fused_lora": bool(run.args.fused_lora),
           "overrides": json.loads(a.overrides), "check_loss": float(l) / int(n),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__,
           "alloc_conf": next((os.environ[v] for v in ALLOCATOR_VARS if v in os.environ), ""),
           "setup_s": round(time.time() - t0, 1), "settings": []}
    dest = Path(a.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = 0
    for budget, k in parse_grid(a.grid):
        if a.budget_s and time.time() - t0 > a.budget_s:
            out["settings"].append({"packing_tokens": budget, "recompute": k, "skipped": "time budget"})
            continue
        layers = set_recompute(run.model, k)
        batches, start = batches_for(ds, lengths, budget, start, a.warmup + a.steps)
        run.optimizer.zero_grad(set_to_none=True)
        bs._reset_mem()
        entry = {"packing_tokens": budget, "recompute": k, "recompute_layers": layers}
        try:
            entry.update(measure(run, batches, a.warmup, counts))
            entry["ok"] = True
        except torch.OutOfMemoryError:
            entry.update(ok=False, error="out of memory", **bs._mem())
            run.optimizer.zero_grad(set_to_none=True)
        del batches
        bs._reset_mem()
        entry.pop("case", None)
        out["settings"].append(entry)
        print(json.dumps({x: entry.get(x) for x in ("packing_tokens", "recompute", "ok", "samples_per_s",
                                                     "tokens_per_s", "max_reserved_gib", "mfu")}), flush=True)
        out["wall_s"] = round(time.time() - t0, 1)
        dest.write_text(json.dumps(out, indent=1))
    out["wall_s"] = round(time.time() - t0, 1)
    dest.write_text(json.dumps(out, indent=1))
    ok = [s for s in out["settings"] if s.get("ok")]
    print("| tokens/step | recompute layers | samples/s | tokens/s | reserved GiB | MFU |\n|---|---|---|---|---|---|")
    for s in sorted(ok, key=lambda s: (s["packing_tokens"], -s["recompute_layers"])):
        print(f"| {s['packing_tokens']} | {s['recompute']} | {s['samples_per_s']} | {s['tokens_per_s']} | "
              f"{s['max_reserved_gib']} | {s['mfu']} |")
    return out


if __name__ == "__main__":
    main()
