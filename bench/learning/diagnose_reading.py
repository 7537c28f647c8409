"""Does a from-scratch preset learn to read from its image tokens? A CPU check on 64 rows (issue 13).

Each row is an image of a 3-digit number (drawn with Pillow, digits 40 px tall) and the answer is the digits,
space-separated. A model that reads the image memorizes 64 rows; one that does not stays at the language-model
floor (loss ~1.15 with this template: only the three digits are unknown). Modes:
  image   the preset as it is (ViT -> merger -> LM)
  oracle  the ViT replaced by a fixed random projection of each 28x28 token's raw pixels (all the information)
  text    control: the digits also written in the prompt as text; the answer copies them

    python bench/learning/diagnose_reading.py --mode text --steps 400     # leaves the floor after ~150 steps
    python bench/learning/diagnose_reading.py --mode image --steps 400    # stays at the floor (2026-12-01)
"""
from __future__ import annotations

import argparse
import io
import random
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def digit_rows(n: int, seed: int = 0) -> list[tuple]:
    from PIL import Image, ImageDraw, ImageFont
    rng, font = random.Random(seed), ImageFont.load_default(size=40)
    rows = []
    for num in rng.sample(range(100, 1000), n):
        im = Image.new("L", (200, 60), 255)
        ImageDraw.Draw(im).text((10, 5), str(num), fill=0, font=font)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        rows.append((Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), " ".join(str(num))))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("image", "oracle", "text"), default="image")
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rope_theta", type=float, default=None, help="override the LM's M-RoPE theta (preset: 1e6)")
    p.add_argument("--rows", type=int, default=64)
    a = p.parse_args(argv)
    import torch
    from transformers import AutoConfig, Qwen2VLForConditionalGeneration

    from ocrtune.models.loading import load_processor
    from ocrtune.models.presets import ensure_preset
    from ocrtune.models.template import Template, collate
    from ocrtune.train.loss import ResponseLoss
    torch.manual_seed(0)
    path = ensure_preset(a.preset)
    cfg = AutoConfig.from_pretrained(path)
    if a.rope_theta:
        cfg.text_config.rope_parameters["rope_theta"] = a.rope_theta
    model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)
    tp = Template(load_processor(path), "qwen2_vl", 2048)
    prompt = "Read it."
    enc = [tp.encode([{"role": "user", "content": prompt + (" " + text if a.mode == "text" else "")},
                      {"role": "assistant", "content": text}], [image]) for image, text in digit_rows(a.rows)]
    if a.mode == "oracle":
        proj = torch.nn.Linear(4 * 1176, cfg.text_config.hidden_size, bias=False).requires_grad_(False)

        def features(self, pixel_values, image_grid_thw, **kw):
            f = proj(pixel_values.view(-1, 4 * 1176))
            return types.SimpleNamespace(pooler_output=f / f.norm(dim=-1, keepdim=True))
        model.model.get_image_features = types.MethodType(features, model.model)
    loss_fn = ResponseLoss(model)
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=a.lr, weight_decay=0.0)
    gen, t0 = torch.Generator().manual_seed(1), time.time()
    for step in range(a.steps + 1):
        idx = torch.randint(0, len(enc), (16,), generator=gen).tolist()
        loss, n, correct = loss_fn(**collate([enc[i] for i in idx], tp.tokenizer.pad_token_id))
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 50 == 0:
            print(f"{a.mode} step {step}: loss {loss.item() / int(n):.3f} token acc {int(correct) / int(n):.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
