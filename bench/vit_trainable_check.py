"""GPU check for a *trained* ViT (full fine-tuning, --freeze_vit false, fp32 weights under bf16
autocast): the one-varlen-call-per-block vision attention gives the same loss and gradients as the
stock per-image attention, and how much faster a training step is.   python bench/vit_trainable_check.py OUT.json"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def main(out_path: str | None):
    from bench_sft import _ensure_datasets_importable
    _ensure_datasets_importable()
    from ocrtune.data.registry import SAMPLE_DIR
    from ocrtune.models.loading import load_model, load_processor
    from ocrtune.models.presets import ensure_preset
    from ocrtune.models.template import Template, collate
    from ocrtune.train.args import SftArgs
    from ocrtune.train.data import EncodedDataset, parquet_rows
    from ocrtune.train.loss import ResponseLoss
    from ocrtune.train.trainer import prepare_model

    d = ensure_preset("small")
    processor = load_processor(d)
    template = Template(processor, "qwen2_vl", 2048)
    template.set_pixels(120000, 30000)
    ds = EncodedDataset(parquet_rows(SAMPLE_DIR / "train.parquet", limit=128), template)
    batch = {k: v.cuda() for k, v in collate([ds[i] for i in range(len(ds))], 0).items()}
    model = load_model(d, torch.float32, "sdpa")
    model = prepare_model(model, SftArgs(train_type="full", freeze_vit=False, gradient_checkpointing=False)).cuda()
    vlm = model.model
    loss_fn = ResponseLoss(model)
    res = {}
    for name, varlen in (("stock", False), ("varlen", True)):
        vlm.visual._ocrtune_varlen = None if varlen else False  # None: patch on first use; False: stock path
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, n, _ = loss_fn(**batch)
        (loss / n).backward()
        grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None and "visual" in k}
        torch.cuda.synchronize()
        t0 = time.time()
        for _ in range(5):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                l, m, _ = loss_fn(**batch)
            (l / m).backward()
        torch.cuda.synchronize()
        res[name] = (float(loss / n), grads, (time.time() - t0) / 5)
    (l1, g1, t1), (l2, g2, t2) = res["stock"], res["varlen"]
    out = {"device": torch.cuda.get_device_name(), "rows": len(ds), "loss_stock": l1, "loss_varlen": l2,
           "loss_rel": abs(l2 - l1) / abs(l1), "worst_vit_grad_rel": max(rel(g2[k], g1[k]) for k in g1),
           "n_vit_grads": len(g1), "s_per_step_stock": t1, "s_per_step_varlen": t2, "speedup": t1 / t2,
           "patched": bool(getattr(vlm.visual, "_ocrtune_varlen", False))}
    print(json.dumps(out), flush=True)
    if out_path:
        Path(out_path).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
