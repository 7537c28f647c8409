"""Which training settings let a from-scratch preset learn to read its image tokens? (issue 13)

`diagnose_reading.py` showed on CPU that the `small` model stays at the language-model floor on images
of numbers for hundreds of steps while it learns a text-copy control quickly. This runs the same kind of
check on a GPU, long enough to see when (or whether) each setting leaves the floor, and on held-out
numbers, so what is measured is reading rather than memorizing:

  task digits: images of 4-digit numbers (random position and size), 4,000 train numbers, 400 others held
               out; the answer is the digits, space-separated (no language prior: every digit is uniform)
  task print:  the first --train_rows LaTeX_OCR print rows, held-out = 400 validation rows

Each variant starts from the same seed and trains --steps steps of --batch rows (padded batches, full
fine-tune, AdamW, the run's loss); every --every steps it logs the train loss and the held-out
teacher-forced token accuracy and loss. One JSON line per evaluation goes to --out.

    python bench/learning/sweep_reading.py --device cuda --steps 1500 --variants base,lr3e-4,vis10 --out /tmp/s.jsonl
"""
from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

# name -> settings changed from the defaults below
VARIANTS = {
    "base": {},
    "lr3e-4": {"lr": 3e-4},
    "lr3e-3": {"lr": 3e-3},
    "lr1e-4": {"lr": 1e-4},
    "warm300": {"warmup": 300},
    "vis10": {"vis_mult": 10.0},                 # the vision tower and merger learn 10x faster
    "freeze300": {"freeze_lm": 300},             # only the vision tower trains for the first 300 steps
    "freeze100": {"freeze_lm": 100},
    "merger_small": {"merger_std": 0.002},       # image features start at the text embeddings' scale
    "untied": {"untie": True},                   # separate input and output embeddings
    "vit2": {"vit_depth": 2},                    # a shallower vision tower
    "vit2_vis10": {"vit_depth": 2, "vis_mult": 10.0},
    "vis10_merger_small": {"vis_mult": 10.0, "merger_std": 0.002},
    "warm300_lr3e-4": {"warmup": 300, "lr": 3e-4},
    "vis0.1": {"vis_mult": 0.1},                 # LM at 1e-3, vision tower + merger at 1e-4 (--vit_lr/--aligner_lr)
    "vis0.03": {"vis_mult": 0.03},               # LM at 1e-3, vision tower + merger at 3e-5
    "lr2e-4": {"lr": 2e-4},
    # the random weights stay frozen, rank-32 LoRA on every attention/MLP Linear of the LM and the vision
    # tower (the recipe's stage 2 targets) learns: full fine-tuning moves each weight by ~lr per step, LoRA
    # moves the output by ~lr x rank instead of ~lr x fan-in
    "lora": {"lora": 32},
    "lora_lr3e-4": {"lora": 32, "lr": 3e-4},
    "lora_r128": {"lora": 128},
    "lora_embed": {"lora": 32, "train_embed": True},  # the (tied) embeddings train too
    # LoRA for the first half, merged, then full fine-tuning of every weight at lr_after
    "lora_then_full": {"lora": 32, "switch": 0.5, "lr_after": 1e-4},
    "lora_then_full3e-4": {"lora": 32, "switch": 0.5, "lr_after": 3e-4},
}
DEFAULTS = {"lr": 1e-3, "warmup": 0, "vis_mult": 1.0, "freeze_lm": 0, "merger_std": None, "untie": False,
            "vit_depth": None, "lora": 0, "train_embed": False, "switch": 0.0, "lr_after": None}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "fc1", "fc2"]


def number_image(num: int, rng: random.Random):
    from PIL import Image, ImageDraw, ImageFont
    size = rng.randint(24, 44)
    font = ImageFont.load_default(size=size)
    im = Image.new("L", (224, 64), 255)
    ImageDraw.Draw(im).text((rng.randint(2, 224 - size * 3), rng.randint(0, max(0, 60 - size))), str(num),
                            fill=rng.randint(0, 60), font=font)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def digit_task(seed: int = 0):
    rng = random.Random(seed)
    nums = rng.sample(range(1000, 10000), 4400)
    rows = [(number_image(n, rng), " ".join(str(n))) for n in nums]
    return rows[:4000], rows[4000:]


def print_task(path: str, val_path: str, train_rows: int):
    import pyarrow.parquet as pq
    from PIL import Image

    def read(p, n):
        t = pq.read_table(p).slice(0, n).to_pylist()
        return [(Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB"), r["text"]) for r in t]
    return read(path, train_rows), read(val_path, 400)


def build(preset: str, s: dict, device):
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from ocrtune.models.presets import ensure_preset
    path = ensure_preset(preset)
    cfg = AutoConfig.from_pretrained(path)
    if s["untie"]:
        cfg.tie_word_embeddings = False
        cfg.text_config.tie_word_embeddings = False
    if s["vit_depth"]:
        cfg.vision_config.depth = s["vit_depth"]
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    if s["merger_std"] is not None:
        last = model.model.visual.merger.mlp[-1]
        torch.nn.init.normal_(last.weight, std=s["merger_std"])
        torch.nn.init.zeros_(last.bias)
    return path, model.to(device)


def evaluate(loss_fn, batches, device) -> dict:
    import torch
    tot, n, c = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            loss, k, hits = loss_fn(**{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()})
            tot, n, c = tot + loss.item(), n + int(k), c + int(hits)
    return {"val_loss": round(tot / n, 4), "val_token_acc": round(c / n, 4)}


def encode(a, rows):
    """(train, held-out, pad id): every row through the preset's template once, shared by the variants."""
    from concurrent.futures import ThreadPoolExecutor

    from ocrtune.models.loading import load_processor
    from ocrtune.models.presets import ensure_preset
    from ocrtune.models.template import Template
    tp = Template(load_processor(ensure_preset(a.preset)), "qwen2_vl", 2048)
    tp.set_pixels(a.max_pixels, a.min_pixels)

    def one(pair):
        im, t = pair
        return tp.encode([{"role": "user", "content": "Read it."}, {"role": "assistant", "content": t}], [im])
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, rows[0])), list(pool.map(one, rows[1])), tp.tokenizer.pad_token_id


def optimizer(model, lr: float, vis_mult: float):
    """AdamW over what trains: the vision tower (and merger) in group 0 at lr x vis_mult, the rest in group 1."""
    import torch
    vis = [q for n, q in model.named_parameters() if (".visual." in n or n.startswith("visual.")) and q.requires_grad]
    ids = {id(q) for q in vis}
    lm = [q for q in model.parameters() if id(q) not in ids and q.requires_grad]
    return torch.optim.AdamW([{"params": vis, "lr": lr * vis_mult}, {"params": lm, "lr": lr}],
                             weight_decay=0.0, betas=(0.9, 0.95))


def run_variant(name: str, a, data, device, out) -> dict:
    import torch

    from ocrtune.models.template import collate
    from ocrtune.train.loss import ResponseLoss
    s = {**DEFAULTS, **VARIANTS[name]}
    _, model = build(a.preset, s, device)
    if s["lora"]:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=s["lora"], lora_alpha=2 * s["lora"], lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
        if s["train_embed"]:
            model.get_input_embeddings().weight.requires_grad_(True)
    train, held, pad = data
    val_batches = [collate(held[i:i + a.batch], pad) for i in range(0, len(held), a.batch)]
    opt = optimizer(model, s["lr"], s["vis_mult"])
    base = [g["lr"] for g in opt.param_groups]
    loss_fn = ResponseLoss(model)
    switch = int(s["switch"] * a.steps) if s["switch"] else None
    gen, t0, log = torch.Generator().manual_seed(1), time.time(), []
    for step in range(a.steps + 1):
        if step == switch:  # the LoRA phase is over: merge it, then every weight trains at lr_after
            model = model.merge_and_unload().requires_grad_(True)
            opt = optimizer(model, s["lr_after"], s["vis_mult"])
            base, loss_fn = [g["lr"] for g in opt.param_groups], ResponseLoss(model)
        if step % a.every == 0:
            model.eval()
            r = {"variant": name, "step": step, **evaluate(loss_fn, val_batches, device),
                 "seconds": round(time.time() - t0, 1)}
            if log:
                r["train_loss"] = round(sum(log) / len(log), 4)
            log = []
            model.train()
            print(json.dumps(r), flush=True)
            out.write(json.dumps(r) + "\n")
            out.flush()
        if step == a.steps:
            break
        f = min(1.0, (step + 1) / s["warmup"]) if s["warmup"] else 1.0
        opt.param_groups[0]["lr"] = base[0] * f
        opt.param_groups[1]["lr"] = 0.0 if step < s["freeze_lm"] else base[1] * f
        idx = torch.randint(0, len(train), (a.batch,), generator=gen).tolist()
        b = collate([train[i] for i in idx], pad)
        loss, n, _ = loss_fn(**{k: v.to(device) if hasattr(v, "to") else v for k, v in b.items()})
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append(loss.item() / int(n))
    return {"variant": name, "settings": s}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=("digits", "print"), default="digits")
    p.add_argument("--data", default=".carry/latex/print/train.parquet")
    p.add_argument("--val_data", default=".carry/latex/print/validation.parquet")
    p.add_argument("--train_rows", type=int, default=13918)
    p.add_argument("--variants", default="base")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--max_pixels", type=int, default=120000)
    p.add_argument("--min_pixels", type=int, default=None, help="upscale smaller images to this many pixels")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(a.device)
    t = time.time()
    rows = digit_task() if a.task == "digits" else print_task(a.data, a.val_data, a.train_rows)
    data = encode(a, rows)
    print(f"{len(data[0])} train / {len(data[1])} held-out rows encoded in {time.time() - t:.0f}s", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as out:
        for name in a.variants.split(","):
            t = time.time()
            run_variant(name, a, data, device, out)
            print(f"{name}: {time.time() - t:.0f}s", flush=True)


if __name__ == "__main__":
    main()
