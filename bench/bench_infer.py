"""Inference speed: plain transformers `generate` vs ocrtune's InferEngine, in one process, same rows,
same model, same batch size; greedy outputs compared row by row.

    (1) baseline: rows in dataset order, batches of --batch_size built the way the transformers docs
        show (images opened, chat text, one `processor(text=..., images=..., padding=True)` call with
        left padding), `model.generate(do_sample=False, max_new_tokens=...)`; timed from the first image
        open to the last decoded answer, so image preprocessing counts.
    (2) ocrtune: `InferEngine.answer_rows` (what `ocrtune eval`/dataset `infer` run): rows sorted by
        prompt length, prompts encoded ahead in a thread pool, greedy loop that drops finished rows.
Both get one small warm-up batch first. `identical_outputs`: every row's answer (text, generated token
count, finish reason) is the same; in bf16 a batch padded differently can flip a near-tie, so
`identical_fraction` is reported too, plus a float32 check on the first --fp32_rows rows (the model
cast to float32 and back, both sides timed) and, with --noise_floor, plain generate against itself with
the rows batched differently (the rate at which bf16 alone flips greedy answers). `--serve` also runs serve's Batcher under --concurrency parallel
requests (ocrtune engine vs the same engine with fast=False, i.e. plain generate per batch).

Models: `--model 7b|2b` builds the preset's config and processor only and creates the weights randomly
on the device (no 15 GB save/load); `tiny`/`small` are the cached presets; any other value is a model or
checkpoint folder loaded as `ocrtune infer --model` loads it. Random weights rarely emit a stop token, so
with 7b/2b every row runs to --max_new_tokens and dropping finished rows has nothing to drop: pass a
trained checkpoint folder to measure that part.

    python bench/bench_infer.py --model 7b --rows 512 --batch_size 256 --max_new_tokens 64 \
        --out bench/results/infer_7b_h200.json --serve
    python bench/bench_infer.py --model tiny --rows 16 --batch_size 8 --max_new_tokens 8 --out /tmp/i.json  # CPU smoke
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OCR_PROMPT = "Using LaTeX to perform OCR on the image."


@contextlib.contextmanager
def stock_forwards(model):
    """The model as transformers runs it, for the plain-generate baseline: every forward that ocrtune's `prepare`
    replaced (patch embedding, ViT attention) is the stock one again until the block ends."""
    patched = [m for m in model.modules() if hasattr(m, "_ocrtune_stock_forward")]
    mine = [m.forward for m in patched]
    for m in patched:
        m.forward = m._ocrtune_stock_forward
    try:
        yield model
    finally:
        for m, f in zip(patched, mine):
            m.forward = f


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(a):
    """(model, processor, template, info) for --model."""
    import torch

    from ocrtune.models.dtypes import pick_device
    from ocrtune.models.loading import load_processor
    from ocrtune.models.presets import build_preset, preset_path
    from ocrtune.models.template import Template
    device = torch.device(a.device) if a.device else pick_device()
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}[a.dtype] if a.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    info = {"model": a.model}
    if a.model in ("2b", "7b"):  # config + processor on disk, weights random on the device
        from transformers import AutoConfig, AutoModelForImageTextToText
        folder = Path(a.model_root) / f"{preset_path(a.model).name}-shape"
        if not (folder / "config.json").exists():
            build_preset(a.model, folder, meta=True)
        torch.manual_seed(a.seed)
        t = time.time()
        with torch.device(device):
            model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder), dtype=dtype,
                                                            attn_implementation=a.attn)
        info.update(weights="random", build_s=round(time.time() - t, 1), folder=str(folder))
        processor_dir, tmpl = folder, "qwen2_vl"
    else:  # presets, hub ids, model folders and ocrtune checkpoints (LoRA or merged): as `ocrtune infer` loads them
        from ocrtune.infer.load import load_for_inference
        from ocrtune.infer.args import InferArgs
        folder = Path(a.model).expanduser()
        args = InferArgs(ckpt_dir=str(folder), dtype=a.dtype) if folder.is_dir() else InferArgs(model=a.model, dtype=a.dtype)
        args.max_pixels = a.max_pixels
        engine, loaded = load_for_inference(args)
        info.update(weights=loaded.get("ckpt_dir") or loaded.get("model_dir"), kind=loaded.get("kind"),
                    template=loaded["template"], dtype=loaded["dtype"], attn=engine.model.config._attn_implementation,
                    max_pixels=engine.processor.image_processor.size.get("longest_edge"))
        return engine.model, engine.processor, engine.template, info
    model.eval()
    model.requires_grad_(False)
    from ocrtune.models.patches import PatchOptions, prepare
    prepare(model, PatchOptions(vision_varlen=True))  # what `ocrtune infer` loads: load_model + load_for_inference
    processor = load_processor(processor_dir)
    template = Template(processor, tmpl)
    if a.max_pixels:
        template.set_pixels(a.max_pixels)
        processor = template.processor  # the bounded copy: plain generate sees the same images
    info.update(template=tmpl, dtype=str(dtype).replace("torch.", ""), attn=a.attn,
                max_pixels=processor.image_processor.size.get("longest_edge"))
    return model, processor, template, info


def read_rows(path: str, n: int) -> list[dict]:
    import pyarrow.parquet as pq
    t = pq.read_table(path).slice(0, n).to_pylist()
    return [{"messages": [{"role": "user", "content": "<image>" + OCR_PROMPT}, {"role": "assistant", "content": r["text"]}],
             "images": [{"bytes": r["image"]["bytes"], "path": None}]} for r in t]


def baseline(engine, rows: list[dict], batch_size: int, max_new_tokens: int) -> tuple[list, list[list[int]]]:
    """Plain transformers: processor-style left-padded batches in dataset order + model.generate.
    Returns (answers, prompt ids of each row)."""
    import torch

    from ocrtune.data.images import open_image
    model, processor, template = engine.model, engine.processor, engine.template
    tok = processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    dtype = next(model.parameters()).dtype
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
               pad_token_id=tok.pad_token_id, eos_token_id=engine.stop_ids())
    answers, prompts = [], []
    try:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            images = [open_image(r["images"][0]) for r in chunk]
            texts = [template.chat_text(r["messages"][:-1], 1, add_generation_prompt=True) for r in chunk]
            inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
            if "mm_token_type_ids" not in inputs:  # transformers 5 computes M-RoPE from it; older processors lack it
                inputs["mm_token_type_ids"] = (inputs["input_ids"] == image_id).long()
            inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
            inputs = {k: v.to(engine.device) for k, v in inputs.items()}
            with torch.no_grad(), stock_forwards(model):
                out = model.generate(**inputs, **gen)
            n = inputs["input_ids"].shape[1]
            for ids, m, new in zip(inputs["input_ids"], inputs["attention_mask"], out[:, n:]):
                prompts.append(ids[m.bool()].tolist())
                answers.append(engine._answer(new))
    finally:
        tok.padding_side = side
    return answers, prompts


def timed(device, fn):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t


def compare(a: list, b: list) -> dict:
    same = [x == y for x, y in zip(a, b, strict=True)]
    return {"identical_outputs": all(same), "identical_fraction": round(sum(same) / max(len(same), 1), 4),
            "differing_rows": [i for i, s in enumerate(same) if not s][:20]}


def fp32_check(a, engine, rows) -> dict:
    """Greedy identity in float32 (the model cast to float32, then back), both sides timed. In float32
    a differently padded or ordered batch moves logits by ~1e-6 instead of bf16's ~1e-2, so a greedy
    tie flip is rare and a difference points at a real bug in the engine."""
    import torch
    model = engine.model
    dtypes = tensor_dtypes(model)
    tf32 = no_tf32()
    try:
        model.float()
        bs = min(a.batch_size, len(rows))
        (base, _), tb = timed(engine.device, lambda: baseline(engine, rows, bs, a.max_new_tokens))
        ours, to = timed(engine.device, lambda: engine.answer_rows(rows, bs, a.max_new_tokens))
        return {"rows": len(rows), "batch_size": bs, "baseline_seconds": round(tb, 3), "ocrtune_seconds": round(to, 3),
                "ratio_vs_generate": round(tb / to, 3), **compare(base, ours)}
    except Exception as e:  # out of memory on a large model: report, keep the main result
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    finally:
        no_tf32(tf32)
        restore_dtypes(model, dtypes)
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()


def no_tf32(before: tuple | None = None) -> tuple:
    """Float32 throughout (returns the settings it replaced; `no_tf32(them)` puts them back): cuDNN runs float32
    convolutions (the stock patch embedding's Conv3d) in TF32 unless told not to, where ocrtune's patch embedding
    is a float32 GEMM; the float32 checks compare decoding, not that rounding."""
    import torch
    now = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before or (False, False)
    return now


def tensor_dtypes(model) -> dict:
    """Each parameter's and buffer's dtype by name: a bf16 model keeps float32 buffers (the rotary inv_freq)."""
    return {**{n: t.dtype for n, t in model.named_parameters()}, **{n: t.dtype for n, t in model.named_buffers()}}


def restore_dtypes(model, dtypes: dict) -> None:
    """Cast each tensor back to its dtype in `dtypes` (`model.to(bf16)` would also round the float32 inv_freq to
    bf16, and every later answer's positions with it)."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if name in dtypes and t.dtype != dtypes[name]:
            owner, _, attr = name.rpartition(".")
            module = model.get_submodule(owner)
            if attr in module._parameters:
                t.data = t.data.to(dtypes[name])
            else:
                module._buffers[attr] = t.to(dtypes[name])



def noise_floor(a, engine, rows, base) -> dict:
    """Plain generate against itself with the rows in reverse order (rows move within and, unless the row
    count is a multiple of the batch size, between batches): how often the dtype alone flips a greedy
    answer, with no engine involved."""
    again, _ = baseline(engine, rows[::-1], a.batch_size, a.max_new_tokens)
    return {"what": "plain generate, rows in reverse order vs dataset order",
            **compare(base, again[::-1])}


def compiled_run(a, model, processor, template, rows, base) -> dict:
    """InferEngine(compile=True): a first untimed pass compiles, the second is timed."""
    from ocrtune.models.generate import InferEngine
    engine = InferEngine(model, processor, template, workers=a.workers, compile=True)
    try:
        _, first = timed(engine.device, lambda: engine.answer_rows(rows, a.batch_size, a.max_new_tokens))
        ours, t = timed(engine.device, lambda: engine.answer_rows(rows, a.batch_size, a.max_new_tokens))
        return {"seconds": round(t, 3), "images_per_s": round(len(rows) / t, 2), "first_pass_seconds": round(first, 3),
                "decoding": engine.last_path, **compare(base, ours)}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    finally:
        engine.close()


def serve_bench(a, model, processor, template, rows) -> dict:
    """serve's Batcher with --concurrency clients, each sending its next request when its answer came: plain generate
    per batch, the engine in whole batches (continuous batching off), and the engine with continuous batching (serve's
    default). Per arm: images/s, generated tokens/s, and each request's latency (sent -> answered), p50 and p95."""
    from ocrtune.models.generate import InferEngine
    from ocrtune.serve.batching import Batcher

    async def run(engine, continuous, min_join=None):
        batcher = Batcher(engine, max_batch_size=a.serve_batch_size, wait_s=0.01, max_queue=max(256, len(rows)),
                          continuous=continuous)
        if min_join is not None and batcher.continuous is not None:
            batcher.continuous.min_join = min_join
        batcher.start()
        sem = asyncio.Semaphore(a.concurrency)
        record = [{"messages": r["messages"][:-1], "images": r["images"]} for r in rows]
        latency = []

        async def one(r):
            async with sem:
                t = time.perf_counter()
                answer = await batcher.generate(r, a.max_new_tokens)
                latency.append(time.perf_counter() - t)
                return answer

        t = time.perf_counter()
        answers = await asyncio.gather(*(one(r) for r in record))
        _sync(engine.device)
        seconds = time.perf_counter() - t
        snap = batcher.snapshot()
        await batcher.stop()
        return answers, seconds, snap, sorted(latency)

    out = {"concurrency": a.concurrency, "max_batch_size": a.serve_batch_size, "requests": len(rows),
           "repeats": max(1, a.repeats)}
    results, timed = {}, {}
    arms = (("generate", False, False), ("ocrtune_whole_batches", True, False), ("ocrtune", True, True),
            ("ocrtune_join_each", True, True))  # the last: continuous, new rows joining one by one (min_join=1)
    engines = {name: InferEngine(model, processor, template, fast=fast, workers=a.workers, check_every=a.check_every,
                                 decode=a.decode)
               for name, fast, _ in arms}
    def arm(name, continuous):  # plain generate on the model as transformers runs it
        with stock_forwards(model) if name == "generate" else contextlib.nullcontext():
            return asyncio.run(run(engines[name], continuous, 1 if name == "ocrtune_join_each" else None))

    for name, _, continuous in arms:
        arm(name, continuous)  # untimed: kernels, allocator, the encoding pool
    for _ in range(max(1, a.repeats)):  # the arms alternate; each keeps its fastest run
        for name, _, continuous in arms:
            run_ = arm(name, continuous)
            if name not in timed or run_[1] < timed[name][1]:
                timed[name] = run_
    for engine in engines.values():
        engine.close()
    for name, _, _ in arms:
        answers, seconds, snap, latency = timed[name]
        results[name] = answers
        tokens = sum(x.tokens for x in answers if not isinstance(x, BaseException))
        pick = lambda q: round(latency[min(len(latency) - 1, int(q * len(latency)))], 3)  # noqa: E731
        out[name] = {"seconds": round(seconds, 3), "images_per_s": round(len(rows) / seconds, 2),
                     "tokens_per_s": round(tokens / seconds, 1), "latency_p50_s": pick(0.5),
                     "latency_p95_s": pick(0.95), "batch_sizes": snap["batch_sizes"],
                     "continuous": snap["continuous"], "max_rows_together": snap["max_batch_size_seen"]}
    for name in ("ocrtune_whole_batches", "ocrtune", "ocrtune_join_each"):
        out[name]["ratio_vs_generate"] = round(out["generate"]["seconds"] / out[name]["seconds"], 3)
    out["ratio_vs_generate"] = out["ocrtune"]["ratio_vs_generate"]
    out.update(compare(results["generate"], results["ocrtune"]))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="7b", help="7b, 2b (random weights), tiny, small, or a model/checkpoint folder")
    p.add_argument("--data", default=".carry/latex/print/validation.parquet", help="LaTeX_OCR parquet (image, text)")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--attn", default="sdpa", help="attention of the 7b/2b random models (folders: transformers' default, sdpa)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max_pixels", type=int, default=None, help="default: the model's processor setting")
    p.add_argument("--workers", type=int, default=None, help="engine's encoding threads (default: cores, at most 8)")
    p.add_argument("--check_every", type=int, default=4, help="engine: decoding steps between finished-row checks")
    p.add_argument("--decode", default="auto", help="engine's greedy decoding: auto, static, dynamic")
    p.add_argument("--repeats", type=int, default=1, help="time each side this many times (alternating); best kept")
    p.add_argument("--fp32_rows", type=int, default=32, help="float32 identity check on this many rows (0: off)")
    p.add_argument("--noise_floor", action="store_true", help="also run plain generate on the rows reversed and "
                   "compare it with itself (how often the dtype alone flips a greedy answer)")
    p.add_argument("--compile", action="store_true", help="also time the engine with compile=True (static KV cache, "
                   "compiled decoding; CUDA only): reported under 'ocrtune_compiled', the main ratio is unchanged")
    p.add_argument("--serve", action="store_true", help="also time serve's Batcher under --concurrency requests")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--serve_batch_size", type=int, default=64)
    p.add_argument("--model_root", default=os.environ.get("TMPDIR", "/tmp"), help="where 7b/2b config folders go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)

    import torch
    import transformers

    from ocrtune.models.generate import InferEngine
    t_start = time.time()
    data = Path(a.data)
    if not data.exists() and not data.is_absolute():
        data = ROOT / a.data
    rows = read_rows(str(data), a.rows)
    model, processor, template, info = load(a)
    engine = InferEngine(model, processor, template, workers=a.workers, check_every=a.check_every, decode=a.decode)
    device = engine.device
    res = {"command": " ".join(shlex.quote(x) for x in [sys.executable.rsplit("/", 1)[-1], *sys.argv]),
           "model": info, "data": str(a.data), "rows": len(rows), "batch_size": a.batch_size,
           "max_new_tokens": a.max_new_tokens, "greedy": True,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "engine_workers": engine.workers, "check_every": engine.check_every}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        res["wall_s"] = round(time.time() - t_start, 1)
        out.write_text(json.dumps(res, indent=1) + "\n")

    warm = rows[:min(8, len(rows))]  # CUDA context, kernels, thread pool
    baseline(engine, warm, len(warm), 2)
    engine.answer_rows(warm, len(warm), 2)
    base_s, ours_s = [], []
    for _ in range(max(1, a.repeats)):
        (base, prompts), t = timed(device, lambda: baseline(engine, rows, a.batch_size, a.max_new_tokens))
        base_s.append(t)
        print(f"baseline generate: {t:.2f}s ({len(rows) / t:.1f} images/s)", flush=True)
        before = dict(engine.stats)
        ours, t = timed(device, lambda: engine.answer_rows(rows, a.batch_size, a.max_new_tokens))
        ours_s.append(t)
        print(f"ocrtune engine:    {t:.2f}s ({len(rows) / t:.1f} images/s)", flush=True)
    stats = {k: engine.stats[k] - before[k] for k in engine.stats}
    errors = [f"{i}: {x}" for i, x in enumerate(ours) if isinstance(x, BaseException)]
    tb, to = min(base_s), min(ours_s)
    encoded = [engine.encode_prompt(r)["input_ids"] for r in rows[:64]]
    res.update({
        "ratio_vs_generate": round(tb / to, 3),
        **compare(base, ours),
        "baseline": {"seconds": round(tb, 3), "images_per_s": round(len(rows) / tb, 2), "all_seconds": [round(x, 3) for x in base_s]},
        "ocrtune": {"seconds": round(to, 3), "images_per_s": round(len(rows) / to, 2), "all_seconds": [round(x, 3) for x in ours_s],
                    "decoding": engine.last_path, "fast_off_reason": engine.fast_reason(), "stats": stats,
                    "row_errors": errors[:5]},
        "prompt_ids_identical_fraction": round(sum(e == q for e, q in zip(encoded, prompts)) / len(encoded), 4),
        "finish_reasons": {r: sum(1 for x in base if x.finish_reason == r) for r in ("stop", "length")},
        "mean_generated_tokens": round(sum(x.tokens for x in base) / len(base), 2),
    })
    print(f"ratio {res['ratio_vs_generate']}x, identical {res['identical_outputs']} ({res['identical_fraction']})", flush=True)
    save()
    if a.noise_floor:
        res["generate_vs_itself"] = noise_floor(a, engine, rows, base)
        print(f"generate vs itself, rows reversed: {res['generate_vs_itself']}", flush=True)
        save()
    if a.compile:
        res["ocrtune_compiled"] = compiled_run(a, model, processor, template, rows, base)
        print(f"compiled engine: {res['ocrtune_compiled']}", flush=True)
        save()
    if a.fp32_rows > 0:
        res["fp32_check"] = fp32_check(a, engine, rows[:a.fp32_rows])
        print(f"float32 check: {res['fp32_check']}", flush=True)
        save()
    if a.serve:
        res["serve"] = serve_bench(a, model, processor, template, rows)
        s = res["serve"]
        print(f"serve: generate {s['generate']['images_per_s']} images/s (p50 {s['generate']['latency_p50_s']} s), "
              f"whole batches {s['ocrtune_whole_batches']['images_per_s']}, continuous {s['ocrtune']['images_per_s']} "
              f"images/s (p50 {s['ocrtune']['latency_p50_s']} s, {s['ratio_vs_generate']}x), identical "
              f"{s['identical_outputs']}", flush=True)
        save()
    engine.close()
    print(f"wrote {out}", flush=True)
    return res


if __name__ == "__main__":
    main()
