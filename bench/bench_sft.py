"""Training throughput and memory: plain transformers Trainer + PEFT (a) vs ocrtune's sft path (b).

One run trains the same random-init Qwen2-VL architecture (built with ocrtune.models.presets) on the
same LaTeX_OCR rows with
  (a) baseline: transformers `Trainer` + PEFT LoRA (r=8, alpha=32, dropout 0.05, all LM linears),
      bf16, gradient checkpointing, sdpa, right-padded batches of --baseline_batch rows;
  (b) ocrtune: `SftRun` (the `ocrtune sft` code path: its model set-up, data pipeline, loss and
      `train_step`) with the same LoRA and gradient checkpointing, plus the speed features:
      padding-free packing up to --packing_tokens per step, response-only fused/chunked CE,
      Liger kernels, no-grad frozen ViT, encode-once cache, dataloader workers + pinned memory.
Each case runs in its own process (clean peak-memory numbers). Both first compute the loss of one
fixed batch (same rows, same weights: LoRA B starts at zero) and the run checks they agree.

Timing: wall clock over steady-state optimizer steps (after --warmup steps), with a device sync
at every step end. Throughput counts samples and non-pad tokens actually trained. MFU counts the
model FLOPs of LoRA training, 4 x (non-embedding LM params) x tokens (forward + input-gradient
backward; frozen weights get no weight gradient; recompute not counted) + lm_head on response
tokens (forward + backward) + the ViT forward, over the H100 SXM dense bf16 peak of 989 TFLOP/s.

    python bench/bench_sft.py --data .carry/print.parquet --models 7b,2b --out $OUT/results.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}
CHECK_ROWS = 8


# ---------------------------------------------------------------- shared helpers

def _ensure_datasets_importable():
    """ocrtune.train.trainer imports `datasets` (for its loaders); the bench feeds rows itself, so a
    stand-in is enough where the package is not installed (the offline GPU machine)."""
    try:
        import datasets  # noqa: F401
    except Exception:
        import types
        m = types.ModuleType("datasets")
        m.Features = m.Value = m.List = m.Sequence = lambda *a, **k: None
        m.Dataset = m.DatasetDict = m.IterableDataset = type("Dataset", (), {})
        m.load_dataset = m.load_from_disk = m.concatenate_datasets = lambda *a, **k: None
        sys.modules["datasets"] = m


def _device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _mem():
    import torch
    if not torch.cuda.is_available():
        return {"max_allocated_gib": None, "max_reserved_gib": None}
    return {"max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "max_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2)}


def _reset_mem():
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _template(model_dir, max_pixels):
    from ocrtune.models.loading import load_processor
    from ocrtune.models.template import Template
    t = Template(load_processor(model_dir), "qwen2_vl", 2048)
    t.set_pixels(max_pixels, None)
    return t


def _flop_counts(model):
    """(non-embedding LM params, lm_head in x out, ViT params)."""
    from ocrtune.train.loss import causal_lm
    lm = causal_lm(model)
    text = lm.model.language_model
    n_text = sum(p.numel() for n, p in text.named_parameters() if "embed_tokens" not in n and "lora_" not in n)
    n_vit = sum(p.numel() for n, p in lm.model.visual.named_parameters() if "lora_" not in n)
    w = lm.lm_head.weight
    return n_text, int(w.shape[0]) * int(w.shape[1]), n_vit


def _model_flops(counts, tokens, response_tokens, patches):
    n_text, n_head, n_vit = counts
    return 4 * n_text * tokens + 6 * n_head * response_tokens + 2 * n_vit * patches


def _summarize(case, steps, counts, warmup, extra):
    import torch
    timed = steps[warmup:]
    wall = sum(s["time"] for s in timed)
    n = sum(s["samples"] for s in timed)
    tok = sum(s["tokens"] for s in timed)
    flops = sum(_model_flops(counts, s["tokens"], s["response"], s["patches"]) for s in timed)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    out = {"case": case, "device": name, "steps_timed": len(timed), "seconds": round(wall, 3),
           "samples_per_s": round(n / wall, 2), "tokens_per_s": round(tok / wall, 1),
           "padded_tokens_per_s": round(sum(s["padded"] for s in timed) / wall, 1),
           "samples_per_step": round(n / max(len(timed), 1), 1), "s_per_step": round(wall / max(len(timed), 1), 3),
           "mfu": round(flops / wall / peak, 4) if peak else None, "model_tflops_per_s": round(flops / wall / 1e12, 1),
           **_mem(), **extra}
    return out


def _batch_stats(batch, merge=4):
    import torch
    ids, labels = batch["input_ids"], batch["labels"]
    if "cu_seq_lens" in batch:
        samples, tokens = len(batch["cu_seq_lens"]) - 1, int(ids.numel())
    else:
        samples, tokens = ids.shape[0], int(batch["attention_mask"].sum())
    response = int((labels[:, 1:] != -100).sum())
    patches = int(batch["image_grid_thw"].prod(-1).sum()) if "image_grid_thw" in batch else 0
    del merge, torch
    return {"samples": samples, "tokens": tokens, "padded": int(ids.numel()), "response": response, "patches": patches}


# ---------------------------------------------------------------- (a) Trainer + PEFT

def run_baseline(a):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback, TrainingArguments

    from ocrtune.models.loading import lora_target_regex
    from ocrtune.models.template import collate
    from ocrtune.train.data import EncodedDataset, parquet_rows

    dev = _device()
    bf16 = dev.type == "cuda"
    template = _template(a.model_dir, a.max_pixels)
    pad = template.tokenizer.pad_token_id
    need = a.baseline_batch * (a.steps + a.warmup)
    ds = EncodedDataset(parquet_rows(a.data, limit=max(need, CHECK_ROWS)), template, cache=True)
    samples = [s for s in (ds[i] for i in range(len(ds))) if s is not None]
    model = AutoModelForImageTextToText.from_pretrained(a.model_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                        attn_implementation="sdpa").to(dev)
    model.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                             target_modules=lora_target_regex(model, ["all-linear"])))
    counts = _flop_counts(model)
    # the fixed-batch loss check: HF's own mean token loss on padded rows
    model.eval()
    with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=bf16):
        batch = {k: v.to(dev) for k, v in collate(samples[:CHECK_ROWS], pad).items()}
        check = float(model(**batch).loss)
    model.train()

    steps, pending = [], []

    def collator(batch):
        b = collate(batch, pad)
        pending.append(_batch_stats(b))
        return b

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            steps.append({**pending.pop(0), "time": time.perf_counter() - self.t})

    targs = TrainingArguments(output_dir="/tmp/bench_baseline", per_device_train_batch_size=a.baseline_batch,
                              max_steps=a.steps + a.warmup, learning_rate=1e-4, lr_scheduler_type="constant",
                              bf16=bf16, gradient_checkpointing=True,
                              gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=10_000,
                              save_strategy="no", report_to=[], remove_unused_columns=False,
                              dataloader_num_workers=0, use_cpu=dev.type != "cuda", seed=42)
    trainer = Trainer(model=model, args=targs, train_dataset=samples, data_collator=collator, callbacks=[Clock()])
    _reset_mem()
    t0 = time.perf_counter()
    trainer.train()
    # step time measured inside the step (between callbacks) misses the data loading between steps,
    # so the wall clock of the whole steady state is used instead when it is longer
    total = time.perf_counter() - t0
    out = _summarize("a_trainer_peft", steps, counts, a.warmup,
                     {"batch": a.baseline_batch, "check_loss": check, "train_wall_s": round(total, 2)})
    return out


# ---------------------------------------------------------------- (b) ocrtune sft

def make_ocrtune_run(a, max_steps=10**6, packing_tokens=None):
    _ensure_datasets_importable()
    from ocrtune.train import trainer as tr
    from ocrtune.train.args import SftArgs
    from ocrtune.train.data import EncodedDataset, parquet_rows

    rows = parquet_rows(a.data, limit=a.rows)

    def build_data(args, template, accelerator):
        return EncodedDataset(rows, template, None, args.seed, cache=True), None

    tr.build_data = build_data
    args = SftArgs(model=a.model_dir, dataset=["bench"], max_steps=max_steps, batch_size=a.batch,
                   packing=True, packing_tokens=packing_tokens, use_liger=a.liger, attn_impl="sdpa",
                   gradient_checkpointing=not a.no_gc, lora_rank=8, lora_alpha=32, lora_dropout=a.lora_dropout,
                   learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_pixels=a.max_pixels,
                   dataloader_num_workers=a.workers, eval_steps=10**9, save_steps=10**9, logging_steps=10**9,
                   output_dir="/tmp/bench_ocrtune", report_to=["none"])
    return tr.SftRun(args)


def run_ocrtune(a):
    import torch
    from ocrtune.train.packing import pack
    t0 = time.perf_counter()
    run = make_ocrtune_run(a, a.steps + a.warmup + 1, a.packing_tokens)
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    lengths = run.train_ds.lengths()  # encodes every row once (the cache the workers share)
    t_encode = time.perf_counter() - t0
    counts = _flop_counts(run.model)
    dev = run.accelerator.device
    # fixed-batch loss check: the first rows, packed, through the training loss module
    ds = run.train_ds
    fixed = [ds[i] for i in range(CHECK_ROWS)]
    run.loss_module.eval()
    with torch.no_grad(), run.accelerator.autocast():
        b = {k: v.to(dev) for k, v in pack(fixed, 0).items()}
        l, n, _ = run.loss_module(**b)
    check = float(l) / int(n)
    _reset_mem()
    steps = []
    stream = run.micro_batches()
    wait = 0.0
    for i in range(a.steps + a.warmup):
        _sync()
        t = time.perf_counter()
        _, batch = next(stream)
        t_data = time.perf_counter() - t
        run.train_step([batch])
        _sync()
        steps.append({**_batch_stats(batch), "time": time.perf_counter() - t})
        if i >= a.warmup:
            wait += t_data
    out = _summarize("b_ocrtune", steps, counts, a.warmup,
                     {"packing_tokens": a.packing_tokens, "liger": bool(a.liger), "gradient_checkpointing": not a.no_gc,
                      "lora_dropout": a.lora_dropout,
                      "workers": a.workers, "check_loss": check, "data_wait_s": round(wait, 3),
                      "setup_s": round(t_setup, 1), "encode_s": round(t_encode, 1), "rows": len(lengths),
                      "mean_sample_tokens": round(sum(lengths) / max(1, sum(1 for x in lengths if x)), 1)})
    return out


def run_budget_probe(a):
    """Peak memory of ocrtune LoRA training steps at growing token budgets (one step each)."""
    import torch
    from ocrtune.train.packing import pack
    run = make_ocrtune_run(a)
    ds = run.train_ds
    lengths = ds.lengths()
    results = []
    for budget in [int(x) for x in a.probe.split(",")]:
        idx, used, i = [], 0, 0  # fill the budget (rows repeat if needed)
        while used + lengths[i % len(lengths)] <= budget:
            if lengths[i % len(lengths)]:
                idx.append(i % len(lengths))
                used += lengths[i % len(lengths)]
            i += 1
        batch = pack([ds[j] for j in idx], 0)
        _reset_mem()
        try:
            run.train_step([batch])  # first step at this size: allocations settle
            _sync()
            t = time.perf_counter()
            run.train_step([batch])
            _sync()
            results.append({"budget": budget, "tokens": used, "samples": len(idx), "ok": True,
                            "s_per_step": round(time.perf_counter() - t, 3),
                            "samples_per_s": round(len(idx) / (time.perf_counter() - t), 1), **_mem()})
        except torch.OutOfMemoryError:
            results.append({"budget": budget, "tokens": used, "samples": len(idx), "ok": False, **_mem()})
            run.optimizer.zero_grad(set_to_none=True)
            break
        print(json.dumps(results[-1]), flush=True)
    return {"case": "budget_probe", "liger": bool(a.liger), "gradient_checkpointing": not a.no_gc,
            "lora_dropout": a.lora_dropout, "probe": results}


def run_profile(a):
    """Where one steady-state step of (b) spends its time: the ViT forward alone, the whole step,
    and the top CUDA kernels of one profiled step."""
    import torch
    run = make_ocrtune_run(a, 100, a.packing_tokens)
    stream = run.micro_batches()
    batches = [next(stream)[1] for _ in range(4)]
    for b in batches[:3]:
        run.train_step([b])
    _sync()
    b = {k: v.to(run.accelerator.device) for k, v in batches[3].items()}
    from ocrtune.train.loss import causal_lm
    vlm = causal_lm(run.model).model
    lm_loss = run.accelerator.unwrap_model(run.loss_module)
    res = {"case": "profile", "stats": _batch_stats(batches[3])}
    for name, fn in (("vit_forward", lambda: lm_loss._embeds(vlm, b["input_ids"], b["pixel_values"], b["image_grid_thw"])),
                     ("train_step", lambda: run.train_step([batches[3]]))):
        ts = []
        for _ in range(3):
            _sync()
            t = time.perf_counter()
            fn()
            _sync()
            ts.append(time.perf_counter() - t)
        res[name + "_s"] = round(sorted(ts)[1], 4)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run.train_step([batches[3]])
        _sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60)
    print(table, flush=True)
    res["top_kernels"] = table.splitlines()[:40]
    return res


# ---------------------------------------------------------------- orchestration

def _child(a, case, extra: list[str], timeout: int):
    cmd = [sys.executable, __file__, "--case", case, "--model_dir", a.model_dir, "--data", a.data,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--rows", str(a.rows),
           "--max_pixels", str(a.max_pixels)] + extra
    print("$", " ".join(cmd), flush=True)
    t = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        print(f"  timed out after {timeout}s\n{(e.stderr or '')[-2000:] if isinstance(e.stderr, str) else ''}", flush=True)
        return {"case": case, "error": f"timeout {timeout}s"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        print(f"  rc={p.returncode}\n{p.stderr[-3000:]}", flush=True)
        return {"case": case, "error": p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else f"rc {p.returncode}"}
    r = json.loads(lines[-1][7:])
    r["process_wall_s"] = round(time.time() - t, 1)
    print("  " + json.dumps(r), flush=True)
    return r


def orchestrate(a):
    from ocrtune.models.presets import build_preset
    results = {"command": " ".join(sys.argv), "data": a.data, "max_pixels": a.max_pixels, "runs": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for size in a.models.split(","):
        model_dir = Path(a.model_root) / f"q{size}"
        if not (model_dir / "config.json").exists():
            t = time.time()
            build_preset(size, model_dir)
            print(f"built {size} in {time.time() - t:.0f}s", flush=True)
            import gc

            import torch
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        a.model_dir = str(model_dir)
        entry = {"model": size}
        if "a" in a.cases:
            entry["a"] = _child(a, "baseline", ["--baseline_batch", str(a.baseline_batch)], a.timeout)
        if "b" in a.cases:
            budgets = [int(x) for x in str(a.packing_tokens_list or a.packing_tokens).split(",")]
            entry["b_all"] = []
            for budget in budgets:
                extra = ["--packing_tokens", str(budget), "--workers", str(a.workers), "--batch", str(a.batch)]
                extra += ["--liger"] if a.liger else []
                extra += ["--no_gc"] if a.no_gc else []
                extra += ["--lora_dropout", str(a.lora_dropout)]
                entry["b_all"].append(_child(a, "ocrtune", extra, a.timeout))
            ok = [r for r in entry["b_all"] if "samples_per_s" in r]
            entry["b"] = max(ok, key=lambda r: r["samples_per_s"]) if ok else entry["b_all"][0]
        if "p" in a.cases and a.probe:
            extra = ["--probe", a.probe, "--lora_dropout", str(a.lora_dropout)] + (["--liger"] if a.liger else [])
            entry["probe"] = _child(a, "probe", extra, a.timeout)
        if "f" in a.cases:
            extra = ["--packing_tokens", str(a.packing_tokens), "--lora_dropout", str(a.lora_dropout)]
            extra += ["--liger"] if a.liger else []
            entry["profile"] = _child(a, "profile", extra, a.timeout)
        ra, rb = entry.get("a", {}), entry.get("b", {})
        if "samples_per_s" in ra and "samples_per_s" in rb:
            entry["ratio_samples_per_s"] = round(rb["samples_per_s"] / ra["samples_per_s"], 2)
            entry["ratio_tokens_per_s"] = round(rb["tokens_per_s"] / ra["tokens_per_s"], 2)
            rel = abs(rb["check_loss"] - ra["check_loss"]) / abs(ra["check_loss"])
            entry["loss_check"] = {"a": ra["check_loss"], "b": rb["check_loss"], "rel_diff": rel, "pass": rel <= 1e-2}
        results["runs"].append(entry)
        out.write_text(json.dumps(results, indent=1))
    print_table(results)
    return results


def print_table(results):
    print(f"\n| model | data | case | samples/s | non-pad tokens/s | MFU | max alloc GiB | max reserved GiB | b/a | loss check |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    data = Path(results["data"]).stem
    for e in results["runs"]:
        for key in ("a", "b"):
            r = e.get(key)
            if not r:
                continue
            if "error" in r:
                print(f"| {e['model']} | {data} | {key} | error: {r['error'][:60]} |||||||")
                continue
            label = "Trainer+PEFT bs%d" % r["batch"] if key == "a" else f"ocrtune pack {r['packing_tokens']}" + (" liger" if r["liger"] else "")
            ratio = e.get("ratio_samples_per_s", "") if key == "b" else ""
            lc = e.get("loss_check", {})
            check = f"{lc['rel_diff']:.1e} {'pass' if lc['pass'] else 'FAIL'}" if (lc and key == "b") else ""
            print(f"| {e['model']} | {data} | {label} | {r['samples_per_s']} | {r['tokens_per_s']} | {r['mfu']} | "
                  f"{r['max_allocated_gib']} | {r['max_reserved_gib']} | {ratio} | {check} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", choices=("all", "baseline", "ocrtune", "probe", "profile"))
    p.add_argument("--cases", default="ab", help="which of a (baseline), b (ocrtune), p (budget probe), f (profile) to run")
    p.add_argument("--data", required=True, help="LaTeX_OCR parquet (image, text)")
    p.add_argument("--models", default="7b,2b")
    p.add_argument("--model_root", default="/tmp")
    p.add_argument("--model_dir")
    p.add_argument("--rows", type=int, default=3000, help="rows of --data used by (b)")
    p.add_argument("--max_pixels", type=int, default=1280 * 28 * 28)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--baseline_batch", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="(b) rows per packed row when no token budget is set")
    p.add_argument("--packing_tokens", type=int, default=16384)
    p.add_argument("--packing_tokens_list", help="comma-separated budgets to try for (b); the best is reported")
    p.add_argument("--liger", action="store_true")
    p.add_argument("--no_gc", action="store_true")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--probe", default="", help="token budgets for the memory probe, e.g. 8192,16384,32768")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--out", default="bench/results/results.json")
    a = p.parse_args()
    if a.case == "all":
        orchestrate(a)
        return
    r = {"baseline": run_baseline, "ocrtune": run_ocrtune, "probe": run_budget_probe, "profile": run_profile}[a.case](a)
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
