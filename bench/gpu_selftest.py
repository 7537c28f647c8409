"""GPU checks of the kernels the CPU tests can't reach: varlen attention (forward and backward)
against per-sample sdpa, and packed vs padded loss/gradients on the tiny model with Liger on.

    python bench/gpu_selftest.py
"""
from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def varlen_case():
    """Packed causal attention (GQA, uneven lengths) in bf16 against a float64 per-sample sdpa reference,
    forward and backward. Returns ({name: (got, want)} for out/dq/dk/dv, warnings raised, whether the
    varlen kernel ran). Also the body of tests/test_cuda.py::test_varlen_attention_matches_sdpa."""
    from ocrtune.models.patches.attention import _VARLEN, packed_attention
    torch.manual_seed(0)
    lens = [37, 120, 5, 300, 64]
    T, H, KV, D = sum(lens), 28, 4, 128
    q = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, KV, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = packed_attention(None, q, k, v, cu, max(lens), scaling=D ** -0.5)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    refs = [torch.nn.functional.scaled_dot_product_attention(
        qd[:, :, s:e], kd[:, :, s:e].repeat_interleave(H // KV, 1), vd[:, :, s:e].repeat_interleave(H // KV, 1),
        is_causal=True, scale=D ** -0.5).transpose(1, 2) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())]
    ref = torch.cat(refs, dim=1)
    (ref * g.double()).sum().backward()
    pairs = {"out": (out, ref), "dq": (q.grad, qd.grad), "dk": (k.grad, kd.grad), "dv": (v.grad, vd.grad)}
    return pairs, [str(x.message) for x in w], _VARLEN["fn"] is not None


def check_varlen():
    pairs, warns, ran = varlen_case()
    return {"varlen_kernel": ran, "warnings": [m[:160] for m in warns],
            **{f"{name}_rel": rel(got, want) for name, (got, want) in pairs.items()}}


def _small_samples():
    """The small preset's folder and the first 12 rows of the bundled sample, encoded."""
    from bench_sft import _ensure_datasets_importable
    _ensure_datasets_importable()
    from ocrtune.data.registry import SAMPLE_DIR
    from ocrtune.models.loading import load_processor
    from ocrtune.models.presets import ensure_preset
    from ocrtune.models.template import Template
    from ocrtune.train.data import EncodedDataset, parquet_rows
    d = ensure_preset("small")
    ds = EncodedDataset(parquet_rows(SAMPLE_DIR / "train.parquet", limit=12), Template(load_processor(d), "qwen2_vl", 2048))
    return d, [ds[i] for i in range(len(ds))]


def check_model(liger: bool):
    from ocrtune.models.loading import load_model
    from ocrtune.models.template import collate
    from ocrtune.train.args import SftArgs
    from ocrtune.train.loss import ResponseLoss
    from ocrtune.data.packing import pack
    from ocrtune.models.patches.liger import apply_liger, liger_fused_ce
    from ocrtune.train.model_setup import prepare_model
    d, samples = _small_samples()
    model = load_model(d, torch.bfloat16, "sdpa")
    applied = apply_liger(model) if liger else False
    model = prepare_model(model, SftArgs(lora_dropout=0.0, packing=True)).cuda()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    fused = liger_fused_ce() if liger else None
    res = {}
    for name, batch in (("padded", collate(samples, 0)), ("packed", pack(samples, 0))):
        model.zero_grad(set_to_none=True)
        batch = {k: v.cuda() for k, v in batch.items()}
        loss, n, _ = ResponseLoss(model, fused_ce=fused)(**batch)
        (loss / n).backward()
        res[name] = (float(loss / n), {k: p.grad.float().clone() for k, p in model.named_parameters() if p.grad is not None})
    (l1, g1), (l2, g2) = res["padded"], res["packed"]
    # the ViT: one varlen call per block (patched, used above) vs the stock per-image loop
    vlm = model.base_model.model.model
    b = {k: v.cuda() for k, v in collate(samples, 0).items()}
    with torch.no_grad():
        grid = b["image_grid_thw"]
        fast = vlm.get_image_features(b["pixel_values"], grid, max_seqlen=int((grid[:, 1] * grid[:, 2]).max())).pooler_output
        stock = vlm.get_image_features(b["pixel_values"], grid).pooler_output
    vit_rel = rel(torch.cat(list(fast)), torch.cat(list(stock)))
    worst = max(rel(g2[k], g1[k]) for k in g1)
    return {"liger_applied": applied, "fused_ce": fused is not None, "loss_padded": l1, "loss_packed": l2,
            "loss_rel": abs(l2 - l1) / abs(l1), "worst_grad_rel": worst, "n_grads": len(g1), "vit_varlen_rel": vit_rel,
            "vit_patched": bool(getattr(vlm.visual, "_ocrtune_varlen", False))}


def check_fused_lora():
    """Fused LoRA add vs PEFT's forward on the small preset in bf16 (float32 LoRA weights under
    autocast, as training runs them), both against a float32 reference of the same weights: the
    fused path must be as close to it as PEFT's own (its error is bf16 rounding, not other math)."""
    import copy
    from ocrtune.models.loading import load_model
    from ocrtune.train.args import SftArgs
    from ocrtune.train.loss import ResponseLoss
    from ocrtune.data.packing import pack
    from ocrtune.train.model_setup import prepare_model
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    d, samples = _small_samples()
    batch = {k: v.to(dev) for k, v in pack(samples, 0).items()}
    base = load_model(d, torch.bfloat16, "sdpa")
    models = {"reference_fp32": prepare_model(copy.deepcopy(base).float(), SftArgs(fused_lora=False, lora_dropout=0.0, packing=True)),
              "stock": prepare_model(copy.deepcopy(base), SftArgs(fused_lora=False, lora_dropout=0.0, packing=True)),
              "fused": prepare_model(base, SftArgs(fused_lora=True, lora_dropout=0.0, packing=True))}
    torch.manual_seed(0)
    with torch.no_grad():
        ref = dict(models["reference_fp32"].named_parameters())
        for n, p in ref.items():
            if "lora_" in n:
                p.normal_(0, 0.05)
        for m in ("stock", "fused"):
            for n, p in models[m].named_parameters():
                if "lora_" in n:
                    p.copy_(ref[n])
    res = {}
    for name, model in models.items():
        loss, n, _ = ResponseLoss(model.to(dev))(**batch)
        (loss / n).backward()
        res[name] = (float(loss.detach() / n), {k: p.grad.float() for k, p in model.named_parameters() if p.grad is not None})
    l0, g0 = res["reference_fp32"]
    out = {"patched_modules": sum(hasattr(m, "_ocrtune_stock_forward") for m in models["fused"].modules()), "n_grads": len(g0)}
    for name in ("stock", "fused"):
        loss, grads = res[name]
        errs = sorted(rel(grads[k], g0[k]) for k in g0)
        out[name] = {"loss": loss, "loss_rel_vs_fp32": abs(loss - l0) / abs(l0), "median_grad_rel_vs_fp32": errs[len(errs) // 2],
                     "worst_grad_rel_vs_fp32": errs[-1]}
    return out


if __name__ == "__main__":
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (("varlen", check_varlen), ("model", lambda: check_model(False)), ("model_liger", lambda: check_model(True)),
                     ("fused_lora", check_fused_lora)):
        try:
            out[name] = fn()
        except Exception as e:  # report, keep going
            import traceback
            traceback.print_exc()
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(name, json.dumps(out[name]), flush=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
