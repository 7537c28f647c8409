"""Training throughput and memory: plain transformers Trainer + PEFT (a), ocrtune's sft path (b) and
ms-swift 4.6 (c).

One run trains the same random-init Qwen2-VL architecture (built with ocrtune.models.presets) on the
same LaTeX_OCR rows with
  (a) baseline: transformers `Trainer` + PEFT LoRA (r=8, alpha=32, dropout 0.05, all LM linears),
      bf16, gradient checkpointing, sdpa, right-padded batches of --baseline_batch rows;
  (b) ocrtune: `SftRun` (the `ocrtune sft` code path: its model set-up, data pipeline, loss and
      `train_step`) with the same LoRA and gradient checkpointing, plus the speed features:
      padding-free packing up to --packing_tokens per step, response-only fused/chunked CE,
      Liger kernels, no-grad frozen ViT, encode-once cache, dataloader workers + pinned memory.
  (c) ms-swift 4.6 (optional anchor, --cases abc): `swift sft` with the recipe of .anchors/ms-swift
      (LoRA r=8 alpha=32 dropout 0.05 on all LM linears, ViT frozen, batch --swift_batch, gradient
      checkpointing, sdpa, bf16) on the same model folder and the same parquet rows; steady-state speed
      from its per-step logging.jsonl between step --swift_warmup and step --swift_steps.
Each case runs in its own process (clean peak-memory numbers). Both first compute the loss of one
fixed batch (same rows, same weights: LoRA B starts at zero) and the run checks they agree.

Timing: wall clock over steady-state optimizer steps (after --warmup steps), with a device sync
at every step end. Throughput counts samples and non-pad tokens actually trained. MFU counts the
model FLOPs of LoRA training, 4 x (non-embedding LM params) x tokens (forward + input-gradient
backward; frozen weights get no weight gradient; recompute not counted) + lm_head on response
tokens (forward + backward) + the ViT forward, over the H100 SXM dense bf16 peak of 989 TFLOP/s.

    python bench/bench_sft.py --data .carry/print.parquet --models 7b,2b --out $OUT/results.json
    python bench/bench_sft.py --data .carry_bench/print.parquet --models 7b --liger --cases abc \
        --b_variants "fused_lora=false;fused_lora=true" --budget_s 550 --out $OUT/print_7b.json
QLoRA (bench/qlora_gpu_call.sh): --quant_bits 4 makes (a) plain Trainer + PEFT + bitsandbytes QLoRA and (b) ocrtune
QLoRA; a variant quant_bits=none adds ocrtune's bf16 LoRA to the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
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
    n_text += sum(b.numel() for n, b in text.named_buffers() if n.endswith("weight_fp8"))  # --fp8_base's weights
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
           "model_flops_per_sample": round(flops / max(n, 1)), "tokens_per_sample": round(tok / max(n, 1), 1),
           "step_s": [round(s["time"], 4) for s in steps], **_mem(), **extra}
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
    if a.quant_bits:  # plain QLoRA as the PEFT/transformers docs show it: bitsandbytes config + prepare_model_for_kbit_training
        from peft import prepare_model_for_kbit_training

        from ocrtune.models.quant import bnb_config
        model = AutoModelForImageTextToText.from_pretrained(a.model_dir, dtype=torch.bfloat16 if bf16 else torch.float32,
                                                            attn_implementation="sdpa", device_map={"": dev},
                                                            quantization_config=bnb_config(a.quant_bits))
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        if dev.type == "cpu":  # CPU smoke runs only: the loss check's eval forward would repack the weights for inference
            from ocrtune.models.quant import keep_training_layout
            keep_training_layout(model)
    else:
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

    targs = TrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "bench_baseline"), per_device_train_batch_size=a.baseline_batch,
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
                     {"batch": a.baseline_batch, "check_loss": check, "train_wall_s": round(total, 2),
                      "quant_bits": a.quant_bits})
    return out


# ---------------------------------------------------------------- (b) ocrtune sft

def parse_value(v: str):
    """A --b_variants value: true/false -> bool, none/null -> None, then int, float, else the string."""
    low = v.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v.strip())
        except ValueError:
            pass
    return v.strip()


def parse_variants(text: str | None) -> list[dict]:
    """'k=v,k2=v2;k=v3' -> [{k: v, k2: v2}, {k: v3}]; an empty variant means no override."""
    if not text:
        return [{}]
    out = []
    for part in text.split(";"):
        ov = {}
        for kv in filter(None, (x.strip() for x in part.split(","))):
            if "=" not in kv:
                raise SystemExit(f"--b_variants: {kv!r} is not key=value")
            k, v = kv.split("=", 1)
            ov[k.strip()] = parse_value(v)
        out.append(ov)
    return out


def unknown_sft_fields(overrides: dict) -> list[str]:
    from ocrtune.train.args import SftArgs
    names = {f.name for f in dataclasses.fields(SftArgs)}
    return sorted(k for k in overrides if k not in names)


def make_ocrtune_run(a, max_steps=10**6, packing_tokens=None, overrides: dict | None = None):
    _ensure_datasets_importable()
    from ocrtune.train import trainer as tr
    from ocrtune.train.args import SftArgs
    from ocrtune.train.data import parquet_rows, rows_data

    rows = parquet_rows(a.data, limit=a.rows)
    kw = dict(model=a.model_dir, dataset=["bench"], max_steps=max_steps, batch_size=a.batch,
              packing=True, packing_tokens=packing_tokens, use_liger=a.liger, attn_impl="sdpa",
              gradient_checkpointing=not a.no_gc, lora_rank=8, lora_alpha=32, lora_dropout=a.lora_dropout,
              learning_rate=1e-4, lr_scheduler_type="constant", warmup_steps=0, max_pixels=a.max_pixels,
              dataloader_num_workers=a.workers, eval_steps=10**9, save_steps=10**9, logging_steps=10**9,
              output_dir=os.path.join(tempfile.gettempdir(), "bench_ocrtune"), report_to=["none"])
    overrides = dict(overrides or {})
    bad = unknown_sft_fields(overrides)
    if bad:
        raise SystemExit(f"unknown SftArgs field(s) in --overrides: {', '.join(bad)}")
    defaults = {f.name: f.default for f in dataclasses.fields(SftArgs)}
    for k, v in overrides.items():  # 0 for a float field is 0.0
        if isinstance(defaults.get(k), float) and isinstance(v, int) and not isinstance(v, bool):
            overrides[k] = float(v)
    kw.update(overrides)
    return tr.SftRun(SftArgs(**kw), data=rows_data(rows, cache=True))


def run_ocrtune(a):
    import torch
    from ocrtune.data.packing import pack
    t0 = time.perf_counter()
    overrides = json.loads(a.overrides or "{}")
    run = make_ocrtune_run(a, a.steps + a.warmup + 1, a.packing_tokens, overrides)
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    lengths = run.train_ds.lengths()
    # encode every row once, before the workers fork and share the cache (in this process: plain samples, which the
    # workers send as one bf16 frame, not the 8 bits of a run's own workers; bench/learning/fed_pixels.py compares)
    for i in range(len(run.train_ds)):
        run.train_ds[i]
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
        batch = next(stream)[-1]  # (epoch, done, size, batch)
        t_data = time.perf_counter() - t
        run.train_step([batch])
        _sync()
        steps.append({**_batch_stats(batch), "time": time.perf_counter() - t})
        if i >= a.warmup:
            wait += t_data
    out = _summarize("b_ocrtune", steps, counts, a.warmup,
                     {"packing_tokens": run.args.packing_tokens, "liger": bool(run.args.use_liger),
                      "gradient_checkpointing": bool(run.args.gradient_checkpointing),
                      "lora_dropout": run.args.lora_dropout, "overrides": overrides,
                      "effective": {k: getattr(run.args, k) for k in overrides},
                      # what the run chose itself on a GPU (the memory plan) or was given
                      "recompute_layers": run.args.recompute_layers, "lean_mlp": run.args.lean_mlp,
                      "memory_plan": None if run.plan is None else {
                          "recompute": run.plan.recompute, "predicted_gib": round(run.plan.predicted / 2**30, 2),
                          "usable_gib": round(run.plan.usable / 2**30, 2), "scale": round(run.plan.scale, 3)},
                      "workers": run.args.dataloader_num_workers, "check_loss": check, "data_wait_s": round(wait, 3),
                      "setup_s": round(t_setup, 1), "encode_s": round(t_encode, 1), "rows": len(lengths),
                      "mean_sample_tokens": round(sum(lengths) / max(1, sum(1 for x in lengths if x)), 1)})
    return out


def fill_budget(lengths, budget: int, start: int = 0) -> tuple[list[int], int, int]:
    """Consecutive rows from `start` (wrapping, so rows repeat if needed; empty rows skipped) until the next
    one would overflow `budget` tokens: (row indices, tokens used, index to continue from)."""
    idx, used, i = [], 0, start
    while used + lengths[i % len(lengths)] <= budget:
        if lengths[i % len(lengths)]:
            idx.append(i % len(lengths))
            used += lengths[i % len(lengths)]
        i += 1
    return idx, used, i


def run_budget_probe(a):
    """Peak memory of ocrtune LoRA training steps at growing token budgets (one step each)."""
    import torch
    from ocrtune.data.packing import pack
    run = make_ocrtune_run(a)
    ds = run.train_ds
    lengths = ds.lengths()
    results = []
    for budget in [int(x) for x in a.probe.split(",")]:
        idx, used, _ = fill_budget(lengths, budget)
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
    batches = [next(stream)[-1] for _ in range(4)]
    for b in batches[:3]:
        run.train_step([b])
    _sync()
    from ocrtune.data.pixels import to_device  # (the loader's light pixels restored, as the training step does)
    b = to_device(batches[3], run.accelerator.device, run.collator.pixel_dtype)
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


# ---------------------------------------------------------------- (c) ms-swift anchor

SWIFT_STEP = "global_step/max_steps"


def _tail(text: str, n: int = 15) -> list[str]:
    """Last n non-empty lines (tqdm's carriage returns split too), each cut to 300 characters."""
    lines = [x.strip() for x in re.split(r"[\r\n]+", text or "") if x.strip()]
    lines = [x for x in lines if not re.search(r"\|.*(it/s|s/it|examples/s)\]$", x)]  # progress bars
    return [x[:300] for x in lines[-n:]]


def _run_proc(cmd, timeout, env=None, log_path=None, cwd=None):
    """Run cmd in its own process group; on timeout end that group (the tool's dataloader workers too).
    Returns (rc or None on timeout, output text)."""
    out = open(log_path, "w") if log_path else subprocess.PIPE
    try:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                             start_new_session=True)
        try:
            text, _ = p.communicate(timeout=max(1, timeout))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    text, _ = p.communicate(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = None
    finally:
        if log_path:
            out.close()
    if log_path:
        text = Path(log_path).read_text(errors="replace")
    return rc, text or ""


def parse_swift_log(lines, batch: int, warmup_step: int) -> dict:
    """Speed and memory from the lines of ms-swift 4.6's logging.jsonl.

    ms-swift (swift/trainers/patcher.py, add_train_message) adds to every log record, i.e. every step with
    --logging_steps 1: 'global_step/max_steps' ("k/N"), 'elapsed_time' (whole seconds, text),
    'train_speed(s/it)' (= elapsed seconds since on_train_begin / steps done, 6 decimals) and, on GPU,
    'memory(GiB)' (the running max of torch.cuda.max_memory_reserved). So the elapsed time at step k is
    train_speed(s/it) x k, and the steady-state speed is (k2 - k1) x batch / (elapsed(k2) - elapsed(k1)) with
    k1 = warmup_step and k2 the last step. The closing record of the run adds HF's 'train_runtime', and
    ms-swift's summary record 'train_dataset' ("mean±std, min=..., max=..., size=N" tokens a sample) and
    'memory'. Returns what it found; 'samples_per_s' only where two timed steps exist."""
    recs = []
    for x in lines:
        if isinstance(x, dict):
            recs.append(x)
            continue
        try:
            recs.append(json.loads(x))
        except (ValueError, TypeError):
            pass
    out: dict = {}
    steps = {}
    for r in recs:
        if SWIFT_STEP in r and "loss" in r and "train_runtime" not in r:
            try:
                k = int(str(r[SWIFT_STEP]).split("/")[0])
            except ValueError:
                continue
            steps[k] = r
        if "train_runtime" in r:
            out["train_runtime_s"] = float(r["train_runtime"])
        if isinstance(r.get("train_dataset"), str):
            m = re.match(r"\s*([0-9.]+)±([0-9.]+).*?size=(\d+)", r["train_dataset"])
            if m:
                out["dataset_tokens_mean"] = round(float(m.group(1)), 2)
                out["dataset_rows"] = int(m.group(3))
    mems = [float(r[k]) for r in recs for k in ("memory(GiB)", "memory")  # absent or 0 without CUDA
            if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) and r[k] > 0]
    out["max_reserved_gib"] = round(max(mems), 2) if mems else None
    out["steps_logged"] = max(steps) if steps else 0
    if steps:
        first = steps[min(steps)]
        out["first_loss"] = first.get("loss")
    timed = {k: float(r["train_speed(s/it)"]) * k for k, r in steps.items()
             if isinstance(r.get("train_speed(s/it)"), (int, float))}
    if timed:
        out["elapsed_s_by_step"] = [round(timed[k], 3) for k in sorted(timed)]  # steps 1..N, for re-analysis
    k2 = max(timed) if timed else None
    k1 = warmup_step if warmup_step in timed else (min(timed) if timed else None)
    if k1 is not None and k2 is not None and k2 > k1 and timed[k2] > timed[k1]:
        dt = timed[k2] - timed[k1]
        out.update({"timed_from_step": k1, "timed_to_step": k2, "steps_timed": k2 - k1, "seconds": round(dt, 3),
                    "samples_per_s": round((k2 - k1) * batch / dt, 2), "s_per_step": round(dt / (k2 - k1), 3),
                    "speed_method": "per-step train_speed(s/it) x step, one run"})
    return out


def _find_logging_jsonl(out_dir: Path) -> Path | None:
    found = sorted(Path(out_dir).rglob("logging.jsonl"), key=lambda f: f.stat().st_mtime)
    return found[-1] if found else None


def write_swift_jsonl(parquet: str, out_dir: Path, limit: int) -> Path:
    """The parquet rows as ms-swift messages + images jsonl (what make_jsonl.py of the recipe writes)."""
    import pyarrow.parquet as pq
    out_dir = Path(out_dir)
    jsonl = out_dir / "train.jsonl"
    if jsonl.exists():
        return jsonl
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    rows = pq.read_table(parquet).slice(0, limit).to_pylist()
    tmp = out_dir / "train.jsonl.tmp"
    with open(tmp, "w") as f:
        for i, r in enumerate(rows):
            img = (out_dir / "img" / f"{i}.png").resolve()
            img.write_bytes(r["image"]["bytes"])
            f.write(json.dumps({"messages": [{"role": "user", "content": "<image>Using LaTeX to perform OCR on the image."},
                                             {"role": "assistant", "content": r["text"]}], "images": [str(img)]}) + "\n")
    os.replace(tmp, jsonl)
    return jsonl


SWIFT_PLUGIN = """# written by bench/bench_sft.py. ms-swift's Qwen2VLTemplate hard-codes the real Qwen2-VL pad ids
# (151655 image, 151656 video) to expand each image's placeholder into its image tokens; a random-init
# model folder with its own small tokenizer has other ids, and without this ms-swift silently trains on
# ONE image token a sample (the vision tower still runs on all patches).
from swift.template.templates.qwen import Qwen2VLTemplate
Qwen2VLTemplate.image_token_id = {image}
Qwen2VLTemplate.video_token_id = {video}
"""


class SwiftError(Exception):
    def __init__(self, msg, tail=None):
        super().__init__(msg)
        self.tail = tail or []


def run_swift(a, size: str, model_dir: str, time_left) -> dict:
    """Case (c): ms-swift 4.6 LoRA SFT on the same model folder and parquet rows. Never raises: a failure
    comes back as {'error': ..., 'log_tail': [...]}."""
    t_start = time.time()
    res = {"case": "c_ms_swift", "batch": a.swift_batch, "max_steps": a.swift_steps, "warmup_steps": a.swift_warmup,
           "swift_model": a.swift_model, "rows": a.swift_rows}
    swift_dir = Path(a.swift_dir)
    if not swift_dir.is_absolute() and not swift_dir.exists():
        swift_dir = ROOT / a.swift_dir
    swift_dir = swift_dir.resolve()
    work = Path(a.swift_work).resolve()
    sites = [s for s in a.swift_site.split(os.pathsep) if s]
    try:
        import torch
        cuda = torch.cuda.is_available()
        site = Path(sites[0])
        installing = site / ".bench_installing"  # left behind by a failed install: install again
        have = (site / "swift" / "__init__.py").exists() and not installing.exists()
        if not (swift_dir / "stubs").is_dir() or not ((swift_dir / "whl").is_dir() or have):
            raise SwiftError(f"no ms-swift recipe at {swift_dir} (stubs/, whl/ with the wheels); carry .anchors")
        # 1. wheels -> --swift_site (once per machine)
        if not have:
            wheels = sorted(str(w) for w in (swift_dir / "whl").glob("*.whl"))
            if not wheels:
                raise SwiftError(f"no wheels in {swift_dir / 'whl'}")
            site.mkdir(parents=True, exist_ok=True)
            installing.touch()
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--upgrade", "--target", str(site), *wheels]
            t = time.time()
            rc, text = _run_proc(cmd, min(120, time_left()))
            if rc != 0:
                raise SwiftError(f"pip install of the ms-swift wheels failed ({'timeout' if rc is None else f'rc {rc}'})",
                                 _tail(text))
            installing.unlink()
            res["install_s"] = round(time.time() - t, 1)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*(str(Path(x).resolve()) for x in sites), str((swift_dir / "stubs").resolve())]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["MAX_PIXELS"] = str(a.max_pixels)  # -> IMAGE_MAX_TOKEN_NUM = max_pixels / 28^2, as (a)/(b)
        env["PYTHONUNBUFFERED"] = "1"
        work.mkdir(parents=True, exist_ok=True)
        # 2. model folder: ours (same weights and tokenizer as (a)/(b)) or the recipe's make_model.py
        if a.swift_model == "own":
            mdir = work / f"model_{size}"
            if not (mdir / "config.json").exists():
                cmd = [sys.executable, str(swift_dir / "make_model.py"), size, str(mdir), str(Path(a.data).resolve())]
                rc, text = _run_proc(cmd, time_left())
                if rc != 0:
                    raise SwiftError(f"make_model.py failed (rc {rc})", _tail(text))
        else:
            mdir = Path(model_dir).resolve()
        cfg = json.loads((mdir / "config.json").read_text())
        res["model_dir"] = str(mdir)
        # 3. data + the template-id plugin
        jsonl = write_swift_jsonl(a.data, work / f"data_{Path(a.data).stem}_{a.swift_rows}", a.swift_rows)
        plugin = work / "swift_plugin_qwen2vl_ids.py"
        plugin.write_text(SWIFT_PLUGIN.format(image=int(cfg["image_token_id"]), video=int(cfg["video_token_id"])))
        res["image_token_id"] = int(cfg["image_token_id"])
        # 4. one run; speed from its per-step log (the recipe's two runs only if that log has no timing)

        def swift(max_steps: int, tag: str) -> dict:
            out_dir = work / f"out_{size}_{tag}"
            if out_dir.exists():
                import shutil
                shutil.rmtree(out_dir)
            cmd = [sys.executable, "-m", "swift.cli.sft", "--model", str(mdir), "--model_type", "qwen2_vl",
                   "--template", "qwen2_vl", "--tuner_type", "lora", "--dataset", str(jsonl),
                   "--torch_dtype", "bfloat16" if cuda else "float32", "--per_device_train_batch_size", str(a.swift_batch),
                   "--gradient_accumulation_steps", "1", "--learning_rate", "1e-4", "--lora_rank", "8",
                   "--lora_alpha", "32", "--lora_dropout", "0.05", "--target_modules", "all-linear",
                   "--freeze_vit", "true", "--gradient_checkpointing", "false" if a.no_gc else "true",
                   "--attn_impl", "sdpa", "--max_steps", str(max_steps), "--logging_steps", "1",
                   "--save_strategy", "no", "--eval_strategy", "no", "--split_dataset_ratio", "0",
                   "--dataloader_num_workers", "4", "--dataset_num_proc", str(min(8, os.cpu_count() or 1)),
                   "--output_dir", str(out_dir), "--report_to", "none", "--max_length", "2048",
                   "--warmup_ratio", "0", "--lazy_tokenize", "false", "--check_model", "false",
                   "--external_plugins", str(plugin)] + shlex.split(a.swift_args or "")
            print("$", " ".join(cmd), flush=True)
            left = time_left()
            if left < 20:
                raise SwiftError(f"skipped: {left:.0f}s left of --timeout / --budget_s")
            t = time.time()
            # cwd: the work folder, so that `python -m` puts no repo folder (tests/, scripts/...) on sys.path
            rc, text = _run_proc(cmd, left, env=env, log_path=str(work / f"swift_{size}_{tag}.log"), cwd=str(work))
            wall = round(time.time() - t, 1)
            log = _find_logging_jsonl(out_dir)
            parsed = parse_swift_log(log.read_text().splitlines() if log else [], a.swift_batch, a.swift_warmup)
            parsed["process_wall_s"] = wall
            if rc != 0:
                why = "timed out" if rc is None else f"rc {rc}"
                done = parsed.get("steps_logged", 0)
                if "samples_per_s" in parsed and (done >= max_steps or (rc is None and parsed["steps_timed"] >= 5)):
                    # ended at/after its last step, or cut by the timeout with enough steps timed: keep the speed
                    parsed["warning"] = f"ms-swift {why} at step {done}/{max_steps}; speed from its log up to there"
                    parsed["log_tail"] = _tail(text, 8)
                else:
                    raise SwiftError(f"ms-swift {why} after {wall}s, {done}/{max_steps} steps", _tail(text))
            if not log:
                raise SwiftError("ms-swift wrote no logging.jsonl", _tail(text))
            return parsed

        r = swift(a.swift_steps, "main")
        if "samples_per_s" not in r and "train_runtime_s" in r:
            # the recipe's method: runs of warmup and max steps, speed from the difference of train_runtime
            r0 = swift(a.swift_warmup, "short")
            dt = r["train_runtime_s"] - r0.get("train_runtime_s", float("nan"))
            n = a.swift_steps - a.swift_warmup
            if dt > 0:
                r.update({"steps_timed": n, "seconds": round(dt, 3), "samples_per_s": round(n * a.swift_batch / dt, 2),
                          "s_per_step": round(dt / n, 3), "speed_method": "train_runtime of two runs (recipe)",
                          "short_run_wall_s": r0.get("process_wall_s")})
        if "samples_per_s" not in r:
            raise SwiftError(f"no steady-state timing in ms-swift's log ({r.get('steps_logged', 0)} steps logged)")
        res.update(r)
        if r.get("dataset_tokens_mean"):
            res["tokens_per_s_est"] = round(r["samples_per_s"] * r["dataset_tokens_mean"], 1)
    except SwiftError as e:
        res["error"] = str(e)
        res["log_tail"] = e.tail
        print(f"  ms-swift: {e}\n    " + "\n    ".join(e.tail), flush=True)
    except Exception as e:  # never lose (a)/(b)
        res["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"  ms-swift: {res['error']}", flush=True)
    res["case_wall_s"] = round(time.time() - t_start, 1)
    if "error" not in res:
        print("  " + json.dumps(res), flush=True)
    return res


# ---------------------------------------------------------------- orchestration

def _child(a, case, extra: list[str], timeout: float):
    cmd = [sys.executable, __file__, "--case", case, "--model_dir", a.model_dir, "--data", a.data,
           "--steps", str(a.steps), "--warmup", str(a.warmup), "--rows", str(a.rows),
           "--max_pixels", str(a.max_pixels)] + extra
    if timeout < 30:
        print(f"  skipped {case}: {timeout:.0f}s of the time budget left", flush=True)
        return {"case": case, "error": f"skipped: {timeout:.0f}s of the time budget left"}
    print("$", " ".join(shlex.quote(x) for x in cmd), flush=True)
    t = time.time()
    rc, text = _run_proc(cmd, timeout)
    if rc is None:
        print(f"  timed out after {timeout:.0f}s\n" + "\n".join(_tail(text, 20)), flush=True)
        return {"case": case, "error": f"timeout {timeout:.0f}s", "log_tail": _tail(text)}
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    if rc != 0 or not lines:
        tail = _tail(text)
        print(f"  rc={rc}\n" + "\n".join(_tail(text, 30)), flush=True)
        return {"case": case, "error": (tail[-1] if tail else f"rc {rc}")[:300], "log_tail": tail}
    r = json.loads(lines[-1][7:])
    r["process_wall_s"] = round(time.time() - t, 1)
    print("  " + json.dumps(r), flush=True)
    return r


def _rel_check(ra, rb):
    if "check_loss" not in ra or "check_loss" not in rb:
        return None
    rel = abs(rb["check_loss"] - ra["check_loss"]) / abs(ra["check_loss"])
    return {"a": ra["check_loss"], "b": rb["check_loss"], "rel_diff": rel, "pass": rel <= 1e-2}


def pick_b(runs: list[dict], ra: dict, max_reserved_gib: float) -> tuple[dict, str]:
    """The fastest (b) run whose loss check passes (where (a) ran) and whose max reserved memory is within
    max_reserved_gib (unknown memory, i.e. CPU, passes). Falls back to the fastest run that finished."""
    for r in runs:
        if "samples_per_s" not in r:
            r["eligible"] = False
            continue
        why = []
        lc = _rel_check(ra, r)
        if lc is not None:
            r["loss_check"] = lc
            if not lc["pass"]:
                why.append(f"loss check {lc['rel_diff']:.1e} > 1e-2")
        if r.get("max_reserved_gib") is not None and r["max_reserved_gib"] > max_reserved_gib:
            why.append(f"max reserved {r['max_reserved_gib']} GiB > {max_reserved_gib} GiB")
        r["eligible"] = not why
        if why:
            r["not_eligible"] = "; ".join(why)
    ok = [r for r in runs if r.get("eligible")]
    if ok:
        return max(ok, key=lambda r: r["samples_per_s"]), "fastest eligible"
    done = [r for r in runs if "samples_per_s" in r]
    if done:
        return max(done, key=lambda r: r["samples_per_s"]), "NO run met the loss check and the memory limit: fastest shown"
    return runs[0], "no run finished"


def orchestrate(a):
    from ocrtune.models.presets import build_preset
    t0 = time.time()

    def time_left(cap=None):
        left = a.budget_s - (time.time() - t0) if a.budget_s else float("inf")
        return min(cap if cap is not None else a.timeout, left - 5)

    variants = parse_variants(a.b_variants)
    results = {"command": " ".join(sys.argv), "data": a.data, "max_pixels": a.max_pixels,
               "b_variants": variants, "b_max_reserved_gib": a.b_max_reserved_gib, "runs": []}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        results["wall_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(results, indent=1))

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
        results["runs"].append(entry)
        if "a" in a.cases:
            extra = ["--baseline_batch", str(a.baseline_batch)] + (["--quant_bits", str(a.quant_bits)] if a.quant_bits else [])
            entry["a"] = _child(a, "baseline", extra, time_left())
            save()
        if "b" in a.cases:
            budgets = [int(x) for x in str(a.packing_tokens_list or a.packing_tokens).split(",")]
            entry["b_all"] = []
            for budget in budgets:
                for ov in variants:
                    if a.quant_bits and "quant_bits" not in ov:  # a variant may name quant_bits=none (bf16 LoRA)
                        ov = {**ov, "quant_bits": a.quant_bits}
                    extra = ["--packing_tokens", str(budget), "--workers", str(a.workers), "--batch", str(a.batch)]
                    extra += ["--liger"] if a.liger else []
                    extra += ["--no_gc"] if a.no_gc else []
                    extra += ["--lora_dropout", str(a.lora_dropout)]
                    extra += ["--overrides", json.dumps(ov)] if ov else []
                    bad = unknown_sft_fields(ov)
                    if bad:
                        r = {"case": "ocrtune", "error": f"unknown SftArgs field(s): {', '.join(bad)}"}
                        print(f"  skipped variant {ov}: {r['error']}", flush=True)
                    else:
                        r = _child(a, "ocrtune", extra, time_left())
                    r.setdefault("overrides", ov)
                    r.setdefault("packing_tokens", budget)
                    entry["b_all"].append(r)
                    save()
            entry["b"], entry["b_pick"] = pick_b(entry["b_all"], entry.get("a", {}), a.b_max_reserved_gib)
            save()
        if "p" in a.cases and a.probe:
            extra = ["--probe", a.probe, "--lora_dropout", str(a.lora_dropout)] + (["--liger"] if a.liger else [])
            entry["probe"] = _child(a, "probe", extra, time_left())
        if "f" in a.cases:
            extra = ["--packing_tokens", str(a.packing_tokens), "--lora_dropout", str(a.lora_dropout)]
            extra += ["--liger"] if a.liger else []
            entry["profile"] = _child(a, "profile", extra, time_left())
        if "c" in a.cases:
            deadline = time.time() + time_left()  # --timeout (or what the budget leaves) for all of (c)
            entry["c"] = run_swift(a, size, a.model_dir, lambda: deadline - time.time())
            save()
        finish_entry(entry)
        save()
    print_table(results)
    return results


def finish_entry(entry):
    """Ratios vs (a) and vs (c), the chosen (b)'s loss check, and (c)'s MFU estimate."""
    ra, rb, rc = entry.get("a") or {}, entry.get("b") or {}, entry.get("c") or {}
    if "samples_per_s" in rc:
        ref = rb if "model_flops_per_sample" in rb else ra
        if "model_flops_per_sample" in ref and ref.get("device"):
            peak = next((v for k, v in PEAK_FLOPS.items() if k in ref["device"]), None)
            flops = rc["samples_per_s"] * ref["model_flops_per_sample"]
            rc["model_tflops_per_s_est"] = round(flops / 1e12, 1)
            rc["mfu_est"] = round(flops / peak, 4) if peak else None
            rc["flops_per_sample_from"] = ref.get("case")
    for r in [ra, rc, *(entry.get("b_all") or [])]:
        if "samples_per_s" in r and "samples_per_s" in ra and r is not ra:
            r["vs_a"] = round(r["samples_per_s"] / ra["samples_per_s"], 2)
        if "samples_per_s" in r and "samples_per_s" in rc and r is not rc:
            r["vs_c"] = round(r["samples_per_s"] / rc["samples_per_s"], 2)
    if "samples_per_s" in ra and "samples_per_s" in rb:
        entry["ratio_samples_per_s"] = round(rb["samples_per_s"] / ra["samples_per_s"], 2)
        entry["ratio_tokens_per_s"] = round(rb["tokens_per_s"] / ra["tokens_per_s"], 2)
        lc = _rel_check(ra, rb)
        if lc:
            entry["loss_check"] = lc
    if "samples_per_s" in rb and "samples_per_s" in rc:
        entry["ratio_b_over_c"] = round(rb["samples_per_s"] / rc["samples_per_s"], 2)
    if "samples_per_s" in ra and "samples_per_s" in rc:
        entry["ratio_c_over_a"] = round(rc["samples_per_s"] / ra["samples_per_s"], 2)


def _fmt(v, pct=False):
    if v is None:
        return ""
    return f"{v * 100:.1f}%" if pct else f"{v}"


def print_table(results):
    print("\n| model | data | case | samples/s | non-pad tokens/s | MFU | max alloc GiB | max reserved GiB "
          "| vs (a) | vs (c) | loss check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    data = Path(results["data"]).stem
    for e in results["runs"]:
        rows = [("a", e.get("a"))] + [("b", r) for r in (e.get("b_all") or ([e["b"]] if e.get("b") else []))]
        rows += [("c", e.get("c"))]
        for key, r in rows:
            if not r:
                continue
            if key == "a":
                label = "(a) Trainer+PEFT bs%s" % r.get("batch", "")
            elif key == "b":
                ov = r.get("overrides") or {}
                label = f"(b) ocrtune pack {r.get('packing_tokens')}" + (" liger" if r.get("liger") else "")
                label += (" [" + ",".join(f"{k}={v}" for k, v in ov.items()) + "]") if ov else ""
                label = ("**" + label + "**") if r is e.get("b") and len(e.get("b_all") or []) > 1 else label
            else:
                label = f"(c) ms-swift 4.6 bs{r.get('batch')}" + (" (partial: see warning)" if r.get("warning") else "")
            if "error" in r:
                print(f"| {e['model']} | {data} | {label} | error: {str(r['error'])[:80]} ||||||||")
                continue
            if key == "c":
                tok = f"~{r['tokens_per_s_est']}" if r.get("tokens_per_s_est") else ""
                mfu = ("~" + _fmt(r.get("mfu_est"), True)) if r.get("mfu_est") is not None else ""
                alloc, check = "", ""
            else:
                tok, mfu, alloc = r.get("tokens_per_s"), _fmt(r.get("mfu"), True), _fmt(r.get("max_allocated_gib"))
                lc = r.get("loss_check") or (e.get("loss_check") if r is e.get("b") else None)
                check = f"{lc['rel_diff']:.1e} {'pass' if lc['pass'] else 'FAIL'}" if (lc and key == "b") else ""
                if key == "b" and r.get("not_eligible"):
                    check += f" (not eligible: {r['not_eligible']})"
            print(f"| {e['model']} | {data} | {label} | {r['samples_per_s']} | {_fmt(tok)} | {mfu} | {alloc} | "
                  f"{_fmt(r.get('max_reserved_gib'))} | {_fmt(r.get('vs_a'))} | {_fmt(r.get('vs_c'))} | {check} |")
        if e.get("b_pick"):
            print(f"  {e['model']}: (b) = {e['b_pick']}" + (f"; (b)/(c) = {e['ratio_b_over_c']}x" if "ratio_b_over_c" in e else ""))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="all", choices=("all", "baseline", "ocrtune", "probe", "profile"))
    p.add_argument("--cases", default="ab",
                   help="which of a (baseline), b (ocrtune), c (ms-swift), p (budget probe), f (profile) to run")
    p.add_argument("--data", required=True, help="LaTeX_OCR parquet (image, text)")
    p.add_argument("--models", default="7b,2b", help="ocrtune presets: 7b, 2b, small, tiny (tiny: CPU smoke test)")
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
    p.add_argument("--b_variants", default="",
                   help="';'-separated (b) variants, each a ','-separated list of SftArgs key=value overrides "
                        "(true/false, none, int, float, else text), e.g. 'fused_lora=false;fused_lora=true'; "
                        "each runs in its own process (x each --packing_tokens_list budget)")
    p.add_argument("--b_max_reserved_gib", type=float, default=40.0,
                   help="(b) is the fastest variant whose loss check passes and whose max reserved memory is <= this")
    p.add_argument("--quant_bits", type=int, choices=(4, 8),
                   help="QLoRA: (a) loads the base with bitsandbytes (NF4, double quant, bf16 compute) and "
                        "prepare_model_for_kbit_training; (b) gets quant_bits unless a --b_variants variant names it "
                        "(quant_bits=none: ocrtune's bf16 LoRA in the same run)")
    p.add_argument("--overrides", help=argparse.SUPPRESS)  # child: JSON of SftArgs overrides
    p.add_argument("--liger", action="store_true")
    p.add_argument("--no_gc", action="store_true")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--probe", default="", help="token budgets for the memory probe, e.g. 8192,16384,32768")
    p.add_argument("--timeout", type=int, default=300, help="seconds for each case's process (and for all of (c))")
    p.add_argument("--budget_s", type=float, default=0,
                   help="wall-clock budget of the whole run in seconds (0: none); later cases get what is left "
                        "and are skipped (recorded as such) when under 30 s remain")
    p.add_argument("--swift_dir", default=".anchors/ms-swift",
                   help="(c) the ms-swift recipe folder (make_model.py, stubs/, whl/ with the wheels of wheels.txt)")
    p.add_argument("--swift_site", default="/tmp/swift_site",
                   help="(c) where the wheels are installed (once; skipped when it holds swift already); "
                        "more folders for its PYTHONPATH may follow, separated by ':'")
    p.add_argument("--swift_work", default="/tmp/bench_swift", help="(c) jsonl, images, logs and outputs")
    p.add_argument("--swift_model", default="ours", choices=("ours", "own"),
                   help="(c) model folder: ours (the same folder as (a)/(b)) or own (built by the recipe's make_model.py: "
                        "same architecture, its own random weights and tokenizer)")
    p.add_argument("--swift_batch", type=int, default=32)
    p.add_argument("--swift_steps", type=int, default=25, help="(c) steps of the one ms-swift run")
    p.add_argument("--swift_warmup", type=int, default=5, help="(c) timing runs from this step to --swift_steps")
    p.add_argument("--swift_rows", type=int, default=1500, help="(c) first rows of --data written to its jsonl")
    p.add_argument("--swift_args", default="", help="(c) extra `swift sft` arguments")
    p.add_argument("--out", default="bench/results/results.json")
    a = p.parse_args()
    if a.case == "all":
        results = orchestrate(a)
        failed = [f"{run.get('model')}:{k}" for run in results.get("runs", []) for k in ("a", "b")
                  if isinstance(run.get(k), dict) and "error" in run[k]]
        if failed:  # the JSON keeps every error; the exit status says that a measured case failed
            print(f"error: case(s) {', '.join(failed)} failed (details in {a.out})", file=sys.stderr)
            sys.exit(1)
        return
    if a.case != "baseline":  # ocrtune's processes start with its allocator default, as `ocrtune sft` does
        from ocrtune.compat import default_cuda_allocator
        default_cuda_allocator()
    r = {"baseline": run_baseline, "ocrtune": run_ocrtune, "probe": run_budget_probe, "profile": run_profile}[a.case](a)
    print("RESULT " + json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
