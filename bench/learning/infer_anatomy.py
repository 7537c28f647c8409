"""Where one batch's inference time goes: prompt encoding, the prompts' M-RoPE positions, the ViT, the language
model's prefill, and a decoding step of plain `generate`, ocrtune's dynamic loop and its static decoder (CUDA graphs).

Each part is timed alone, warm, with the device synchronized around it, on one batch of --rows pre-encoded rows
(the bundled sample in dataset order, as bench_decode's model_only batch). A decoding step's cost is the slope
between two runs of each decoder (--short and --long new tokens), so the prefill and the set-up cancel out.

    python bench/learning/infer_anatomy.py --model 7b --rows 256 --out /tmp/anatomy_7b.json      # one H100, ~2 min
    python bench/learning/infer_anatomy.py --model tiny --rows 8 --short 2 --long 4 --out /tmp/a.json   # CPU smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_decode  # noqa: E402
import bench_infer  # noqa: E402


def timed(device, fn, reps: int = 1) -> tuple:
    """(last result, seconds per call) of `reps` calls after one untimed call."""
    out = fn()
    bench_infer._sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    bench_infer._sync(device)
    return out, (time.perf_counter() - t) / reps


def ms(x: float) -> float:
    return round(1000 * x, 2)


def vision_parts(hf, batch: dict, device) -> dict:
    """The ViT as transformers runs it (per-image attention, position ids built per image on the device) against
    ocrtune's training path (host position ids; one varlen attention call per block once `vision_varlen` is on)."""
    import torch

    from ocrtune.models.patches import PatchOptions, forward, prepare
    lm, vlm = hf, hf.model
    args = (batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    res = {}
    with torch.no_grad():
        _, t = timed(device, lambda: vlm.get_image_features(batch["pixel_values"], batch["image_grid_thw"]), 3)
        res["vit_stock_ms"] = ms(t)
        prepare(hf, PatchOptions(patch_embed=False))  # marks the model prepared: `image_embeds` refuses others
        _, t = timed(device, lambda: forward.image_embeds(lm, vlm, *args), 3)
        res["embeds_host_ids_ms"] = ms(t)
        res["varlen"] = prepare(hf, PatchOptions(patch_embed=False, vision_varlen=True))["vision_varlen"]
        _, t = timed(device, lambda: forward.image_embeds(lm, vlm, *args), 3)
        res["embeds_host_ids_varlen_ms"] = ms(t)
    return res


def positions(engine, hf, batch: dict, device) -> dict:
    """The prompts' M-RoPE positions from the model's get_rope_index, on the device (today) and on the host."""
    import torch
    host = {k: v.cpu() for k, v in batch.items()}
    with torch.no_grad():
        _, dev_t = timed(device, lambda: engine._prompt_positions(hf, batch), 3)
        _, host_t = timed(device, lambda: engine._prompt_positions(hf, host), 3)
    return {"rope_index_device_ms": ms(dev_t), "rope_index_host_ms": ms(host_t)}


def prefill(hf, batch: dict, pos, device) -> dict:
    """The whole prefill forward as the decoders run it (ViT included), and the language model alone on the
    prompts' embeddings."""
    import torch

    from ocrtune.models import static_decode
    kw = static_decode.prefill_inputs(hf, batch)
    with torch.no_grad():
        _, t_all = timed(device, lambda: hf(**kw, attention_mask=batch["attention_mask"], position_ids=pos,
                                            use_cache=True), 2)
        embeds = hf.model.get_input_embeddings()(batch["input_ids"])
        _, t_lm = timed(device, lambda: hf.model.language_model(inputs_embeds=embeds, attention_mask=batch[
            "attention_mask"], position_ids=pos, use_cache=True), 2)
    return {"prefill_forward_ms": ms(t_all), "prefill_language_model_ms": ms(t_lm)}


def steps(a, eng: dict, encoded: list[dict], device) -> dict:
    """Per decoding step (slope between --short and --long new tokens) and the fixed part of each decoder."""
    res = {}
    paths = {"generate": lambda n: bench_decode.plain_generate(eng["dynamic"], encoded, n),
             "dynamic": lambda n: eng["dynamic"].generate_answers(encoded, n),
             "static": lambda n: eng["static"].generate_answers(encoded, n)}
    for name, fn in paths.items():
        _, short = timed(device, lambda: fn(a.short))
        got, long = timed(device, lambda: fn(a.long))
        n_long = max(x.tokens for x in got)
        per = (long - short) / max(n_long - a.short, 1)
        res[name] = {"short_s": round(short, 3), "long_s": round(long, 3), "long_tokens": n_long,
                     "step_ms": ms(per), "fixed_ms": ms(short - per * (a.short - 1))}
        print(f"{name}: {res[name]}", flush=True)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="7b")
    p.add_argument("--data", default="ocrtune/data/sample/train.parquet")
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--short", type=int, default=8)
    p.add_argument("--long", type=int, default=40)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--device", default=None)
    p.add_argument("--max_pixels", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--check_every", type=int, default=4)
    p.add_argument("--model_root", default="/tmp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch
    t0 = time.time()
    rows = bench_decode.rows_of(ROOT / a.data, a.rows)
    model, processor, template, info = bench_infer.load(a)
    eng = bench_decode.engines(model, processor, template, a)
    engine = eng["static"]
    device = engine.device
    hf = engine._hf_model()
    res = {"command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "model": info, "rows": len(rows),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__}
    _, t = timed(device, lambda: engine._encode_all(rows))
    res["encode_pool_ms"] = ms(t)
    encoded = engine._encode_all(rows)
    batch, t = timed(device, lambda: engine._batch(encoded), 3)
    res["batch_ms"] = ms(t)
    real = int(batch["attention_mask"].sum())
    res["prompt_tokens"] = {"real": real, "padded": batch["input_ids"].numel(),
                            "image_patches": int(batch["image_grid_thw"].prod(-1).sum())}
    res.update(positions(engine, hf, batch, device))
    pos = engine._prompt_positions(hf, batch)
    res.update(prefill(hf, batch, pos, device))
    print(json.dumps(res), flush=True)
    res["steps"] = steps(a, eng, encoded, device)
    res.update(vision_parts(hf, batch, device))  # last: it patches the model
    res["wall_s"] = round(time.time() - t0, 1)
    for e in eng.values():
        e.close()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
