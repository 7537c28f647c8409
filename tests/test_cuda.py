"""GPU correctness checks: the kernels the CPU suite cannot reach, against the stock
forwards, on small random Qwen2-VL configs in bf16 on CUDA.

- varlen attention (FlashAttention varlen through torch) vs per-sample sdpa, forward and backward;
- the ViT with one varlen call per block vs transformers' per-image attention;
- the patch-embed GEMM vs the Conv3d;
- fused LoRA vs PEFT's forward and backward (one layer, and the whole small model);
- packed vs padded loss and gradients (sdpa, and with Liger where it is installed: last, because Liger
  patches transformers' module functions for the whole process).

Tolerances come from bf16 arithmetic (tests/tolerance.py: `bf16_rtol(roundings)`), or, for whole-model
gradients, from the bf16 error the stock path itself carries against a float32 reference of the same
weights: the fast path must be as accurate as the stock one. Marked `cuda`: the default run leaves them out
(pyproject: `-m "not cuda"`), `bench/run_cuda_tests.sh` runs them on the GPU machine, and without CUDA
they skip. `pytest -m cuda --collect-only` collects them anywhere.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from tolerance import U_BF16, bf16_rtol, rel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_sft import _ensure_datasets_importable  # noqa: E402  (the datasets stand-in, one copy)
from gpu_selftest import varlen_case  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU checks)")]


@pytest.fixture(scope="module")
def small():
    """The small preset (6+6 layers, random weights) and 12 encoded rows of the bundled sample."""
    _ensure_datasets_importable()
    from ocrtune.data.registry import SAMPLE_DIR
    from ocrtune.models.loading import load_processor
    from ocrtune.models.presets import ensure_preset
    from ocrtune.models.template import Template
    from ocrtune.train.data import EncodedDataset, parquet_rows
    d = ensure_preset("small")
    ds = EncodedDataset(parquet_rows(SAMPLE_DIR / "train.parquet", limit=12), Template(load_processor(d), "qwen2_vl", 2048))
    samples = [ds[i] for i in range(len(ds))]
    assert all(s is not None for s in samples)
    return d, samples


def _cuda(batch):
    return {k: v.cuda() for k, v in batch.items()}


def _lora_model(d, dtype, fused_lora=True, liger=False, lean_mlp=False, lean_mlp_fp8=False, fp8_base=False,
                modules_to_save=None):
    from ocrtune.models.loading import load_model
    from ocrtune.models.patches.liger import apply_liger
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import prepare_model
    model = load_model(d, dtype, "sdpa")
    if liger:
        assert apply_liger(model)
    # packing=True: packed rows run the varlen attention, as `ocrtune sft --packing` has them
    model = prepare_model(model, SftArgs(model="tiny", lora_dropout=0.0, fused_lora=fused_lora, lean_mlp=lean_mlp, packing=True,
                                         lean_mlp_fp8=lean_mlp_fp8, modules_to_save=modules_to_save)).cuda()
    if fp8_base:  # as SftRun does, on the device
        from ocrtune.models.patches import PatchOptions, prepare
        assert prepare(model, PatchOptions(patch_embed=False, fp8_base=True))["fp8_base"] > 0
    return model


def _skip_without_liger(liger: bool) -> None:
    from ocrtune.models.patches.liger import liger_unavailable_reason
    if liger and liger_unavailable_reason() is not None:
        pytest.skip(f"Liger: {liger_unavailable_reason()}")


def _set_lora(models, std=0.02, seed=0):
    """The same random LoRA weights in every model (B starts at zero: give the adapters a say)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        first = dict(models[0].named_parameters())
        for n, p in first.items():
            if "lora_" in n:
                p.normal_(0, std)
        for m in models[1:]:
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(first[n])


def _loss_and_grads(model, batch, fused_ce=None):
    from ocrtune.train.loss import ResponseLoss
    model.zero_grad(set_to_none=True)
    loss, n, _ = ResponseLoss(model, fused_ce=fused_ce)(**batch)
    (loss / n).backward()
    return float(loss.detach() / n), int(n), {k: p.grad.detach().float().clone()
                                              for k, p in model.named_parameters() if p.grad is not None}


def _grad_errors(grads, ref):
    errs = sorted(rel(grads[k], ref[k]) for k in ref)
    return errs[len(errs) // 2], errs[-1]


# ---------------------------------------------------------------- kernels vs stock forwards

def test_varlen_attention_matches_sdpa():
    """Packed causal attention (GQA, uneven lengths) vs sdpa per sample in float64, forward and backward.
    The kernel stores P and the output in bf16 (2 roundings); backward adds the saved output, P, dS and
    the result (4)."""
    from ocrtune.models.patches.attention import _get_varlen
    assert _get_varlen() is not None, "torch.nn.attention.varlen is unavailable: packed rows fall back to a dense mask"
    pairs, warns, ran = varlen_case()
    assert ran and warns == [], warns  # no fallback warning: the varlen kernel ran
    assert rel(*pairs["out"]) <= bf16_rtol(2)
    for name in ("dq", "dk", "dv"):
        assert rel(*pairs[name]) <= bf16_rtol(4), name


def test_patch_embed_gemm_matches_conv():
    """The patch embedding as one GEMM vs transformers' Conv3d, bf16 on CUDA, at the real ViT width,
    both against a float64 reference: the GEMM stores its output (and the weight gradient) once in bf16."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    from ocrtune.models.patches.vision import linear_patch_embed
    torch.manual_seed(0)
    stock = PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=1280).cuda().bfloat16()
    fast = copy.deepcopy(stock)
    assert linear_patch_embed(fast) == 1
    pixels = torch.randn(4096, 3 * 2 * 14 * 14, device="cuda")
    out_s, out_f = stock(pixels), fast(pixels)
    g = torch.randn_like(out_s)
    (out_s * g).sum().backward()
    (out_f * g).sum().backward()
    w = stock.proj.weight.detach().double().reshape(1280, -1).requires_grad_(True)
    ref = pixels.bfloat16().double() @ w.t()
    (ref * g.double()).sum().backward()
    assert rel(out_f, ref) <= bf16_rtol(1) + U_BF16  # one rounding, plus float32 accumulation over 1176 terms
    assert rel(out_f, out_s) <= bf16_rtol(2)
    assert rel(fast.proj.weight.grad.reshape(1280, -1), w.grad) <= bf16_rtol(2)
    assert rel(fast.proj.weight.grad, stock.proj.weight.grad) <= bf16_rtol(4)


def test_vit_varlen_matches_stock(small):
    """The whole ViT with one varlen call per block vs transformers' per-image attention, both bf16: each
    block's attention stores P and its output in bf16 on each side (4 roundings a block, `depth` blocks);
    and the varlen ViT is as accurate as the stock one against a float32 reference of the same weights."""
    from ocrtune.models.loading import load_model
    from ocrtune.models.patches import PatchOptions, prepare
    from ocrtune.models.template import collate
    d, samples = small
    model = load_model(d, torch.bfloat16, "sdpa").cuda()
    assert prepare(model, PatchOptions(vision_varlen=True))["vision_varlen"] is True
    reference = copy.deepcopy(model).float()
    b = _cuda(collate(samples, 0))
    grid = b["image_grid_thw"]
    with torch.no_grad():
        fast = model.model.get_image_features(b["pixel_values"], grid,
                                              max_seqlen=int((grid[:, 1] * grid[:, 2]).max())).pooler_output
        stock = model.model.get_image_features(b["pixel_values"], grid).pooler_output  # patched forward defers
        ref = reference.model.get_image_features(b["pixel_values"], grid).pooler_output
    fast, stock, ref = (torch.cat(list(x)) for x in (fast, stock, ref))
    depth = model.config.vision_config.depth
    assert rel(fast, stock) <= bf16_rtol(4 * depth)
    assert rel(fast, ref) <= 2 * rel(stock, ref)


# ---------------------------------------------------------------- fused LoRA vs PEFT

def test_fused_lora_layer_matches_peft():
    """One LoRA Linear (bf16 base, float32 adapters under bf16 autocast, as training runs them): the fused
    addmm vs PEFT's matmul, scale and add. PEFT stores the LoRA product, the scaled product and the sum
    in bf16 (3 roundings) where the fused path stores the sum once (1), so outputs differ by at most 4
    roundings; the adapter gradients by at most 6 (PEFT: the scaled output gradient, the product's input
    gradient, the weight gradient; fused: the two last)."""
    from peft import LoraConfig, get_peft_model

    from ocrtune.models.patches.lora import fuse_lora_linears
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(1024, 1024)).cuda().bfloat16()
    stock = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["0"]))
    for n, p in stock.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
    fused = copy.deepcopy(stock)
    assert fuse_lora_linears(fused) == 1
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    outs, grads = {}, {}
    for name, model in (("stock", stock), ("fused", fused)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x)
        (out.float() * g.float()).sum().backward()
        outs[name] = out.detach()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert outs["fused"].dtype == torch.bfloat16
    assert rel(outs["fused"], outs["stock"]) <= bf16_rtol(4)
    assert grads["fused"].keys() == grads["stock"].keys() and len(grads["stock"]) == 2
    for n in grads["stock"]:
        assert rel(grads["fused"][n], grads["stock"][n]) <= bf16_rtol(6), n


def test_fused_lora_model_matches_peft(small):
    """The small model with LoRA on every language-model linear, fused vs PEFT's forward, both bf16
    against a float32 reference of the same weights: the fused path is as accurate as PEFT's own (its
    difference from PEFT is rounding, not other math), and the loss within a rounding on each path."""
    from ocrtune.data.packing import pack
    d, samples = small
    reference = _lora_model(d, torch.float32, fused_lora=False)
    stock = _lora_model(d, torch.bfloat16, fused_lora=False)
    fused = _lora_model(d, torch.bfloat16, fused_lora=True)
    assert sum(hasattr(m, "_ocrtune_stock_forward") and hasattr(m, "lora_A") for m in fused.modules()) > 0
    assert not any(hasattr(m, "_ocrtune_stock_forward") and hasattr(m, "lora_A") for m in stock.modules())
    _set_lora([reference, stock, fused], std=0.05)
    batch = _cuda(pack(samples, 0))
    l_ref, _, g_ref = _loss_and_grads(reference, batch)
    l_stock, _, g_stock = _loss_and_grads(stock, batch)
    l_fused, _, g_fused = _loss_and_grads(fused, batch)
    assert abs(l_fused - l_stock) / abs(l_stock) <= bf16_rtol(2)
    med_s, worst_s = _grad_errors(g_stock, g_ref)
    med_f, worst_f = _grad_errors(g_fused, g_ref)
    assert worst_f <= 1.5 * worst_s + bf16_rtol(1), (worst_f, worst_s)
    assert med_f <= 1.5 * med_s + bf16_rtol(1), (med_f, med_s)


@pytest.mark.parametrize("liger", [False, True], ids=["stock_kernels", "liger"])
def test_lean_mlp_matches_fused_lora(small, liger):
    """--lean_mlp (the SwiGLU product recomputed in the down projection's backward) in bf16, with and
    without Liger's kernels: the loss within a rounding of the fused path's, the gradients as accurate
    against a float32 reference as the fused path's own."""
    from ocrtune.data.packing import pack
    _skip_without_liger(liger)
    d, samples = small
    reference = _lora_model(d, torch.float32)
    fused = _lora_model(d, torch.bfloat16, liger=liger)
    lean = _lora_model(d, torch.bfloat16, liger=liger, lean_mlp=True)
    assert sum(hasattr(m, "_ocrtune_stock_forward") and hasattr(m, "down_proj") for m in lean.modules()) > 0
    _set_lora([reference, fused, lean], std=0.05)
    batch = _cuda(pack(samples, 0))
    _, _, g_ref = _loss_and_grads(reference, batch)
    l_fused, _, g_fused = _loss_and_grads(fused, batch)
    l_lean, _, g_lean = _loss_and_grads(lean, batch)
    assert g_lean.keys() == g_fused.keys() and len(g_fused) > 0
    assert abs(l_lean - l_fused) / abs(l_fused) <= bf16_rtol(2)
    med_f, worst_f = _grad_errors(g_fused, g_ref)
    med_l, worst_l = _grad_errors(g_lean, g_ref)
    assert worst_l <= 1.5 * worst_f + bf16_rtol(1), (worst_l, worst_f)
    assert med_l <= 1.5 * med_f + bf16_rtol(1), (med_l, med_f)


@pytest.mark.parametrize("liger", [False, True], ids=["stock_kernels", "liger"])
def test_lean_mlp_fp8_stays_near_the_lean_mlp(small, liger):
    """--lean_mlp_fp8 in bf16 (gate/up kept in float8 e4m3 with a scale per token): the same loss as --lean_mlp
    (the forward is unchanged: within a rounding), and gradients that differ from a float32 reference by at most the lean path's
    error plus 2^-3: the backward multiplies two kept values, each rounded by at most 2^-4."""
    from ocrtune.data.packing import pack
    _skip_without_liger(liger)
    d, samples = small
    reference = _lora_model(d, torch.float32)
    lean = _lora_model(d, torch.bfloat16, liger=liger, lean_mlp=True)
    fp8 = _lora_model(d, torch.bfloat16, liger=liger, lean_mlp_fp8=True)
    _set_lora([reference, lean, fp8], std=0.05)
    batch = _cuda(pack(samples, 0))
    _, _, g_ref = _loss_and_grads(reference, batch)
    l_lean, _, g_lean = _loss_and_grads(lean, batch)
    kept = set()

    def note(t):
        kept.add(t.dtype)
        return t
    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        l_fp8, _, g_fp8 = _loss_and_grads(fp8, batch)
    assert torch.float8_e4m3fn in kept  # the float8 branch ran (not a fallback to the plain MLP)
    assert abs(l_fp8 - l_lean) / abs(l_lean) <= bf16_rtol(2)  # equal up to kernel nondeterminism
    med_l, worst_l = _grad_errors(g_lean, g_ref)
    med_8, worst_8 = _grad_errors(g_fp8, g_ref)
    assert worst_8 <= worst_l + 2 ** -3 and med_8 <= med_l + 2 ** -3, (worst_8, worst_l, med_8, med_l)


def test_triton_kernels_match_the_torch_ops():
    """The lean MLP's fused kernels compiled on CUDA (the CPU suite runs them only in Triton's interpreter):
    float8 values and scales (the lean MLP's, and `--fp8_base`'s row quantizer) bit for bit those of the torch ops (IEEE division, round to nearest, saturating);
    bf16 outputs within one rounding (2^-8 relative, plus float32's ~1e-7) of float64 math on the same inputs; rows over the
    kernel's block width, a zero row, and a model-sized row (18944, Qwen2-VL-7B's intermediate size)."""
    from ocrtune.models import triton_kernels
    from ocrtune.models.fp8_linear import quantize_rows_torch
    from ocrtune.models.lora_addmm import from_fp8_rows
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (2500, 18944):
        gate = (torch.randn(65, n, device="cuda", generator=g) * 3).to(torch.bfloat16)
        up = torch.randn(65, n, device="cuda", generator=g).to(torch.bfloat16)
        gate[7] = 0
        assert triton_kernels.usable(gate, up)
        h, (gq, gs, uq, us), _ = triton_kernels.swiglu_forward(gate, up, torch.bfloat16, True)
        for q, sc, t in ((gq, gs, gate), (uq, us, up)):
            rq, rs = quantize_rows_torch(t)
            assert torch.equal(sc, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
        cols = torch.rand(n, device="cuda", generator=g) + 0.5  # --fp8_base folds W's scales into dy's columns
        for col in (None, cols):
            q1, s1 = triton_kernels.quantize_rows(gate, col)
            q2, s2 = quantize_rows_torch(gate, col)
            assert torch.equal(s1, s2) and torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))
        G, U = gate.double(), up.double()
        sig = torch.sigmoid(G)
        assert bool(((h.double() - G * sig * U).abs() <= 2 ** -8 * (G * sig * U).abs() + 1e-6).all())
        dh = torch.randn(65, n, device="cuda", generator=g).to(torch.bfloat16)
        D = dh.double()
        for kept in ((gate, up, None, None), (gq, uq, gs, us)):
            dg, du, h2 = triton_kernels.swiglu_backward(dh, kept[0], kept[1], kept[2], kept[3],
                                                (torch.bfloat16, torch.bfloat16), torch.bfloat16)
            Gk = from_fp8_rows(gq, gs, torch.float64) if kept[2] is not None else G
            Uk = from_fp8_rows(uq, us, torch.float64) if kept[2] is not None else U
            sk = torch.sigmoid(Gk)
            for got, want in ((du, D * Gk * sk), (dg, D * Uk * sk * (1 + Gk * (1 - sk))), (h2, Gk * sk * Uk)):
                # float32 math (cancellation in 1 + g(1 - sig)) adds ~1e-7 of the largest value
                assert bool(((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-6 * want.abs().max()).all())


def test_dropout_kernels_draw_one_mask_and_beat_the_stored_mask():
    """The LoRA dropout drawn inside the Triton kernels, compiled: its keep rate, one mask for one (seed, shape)
    in the standalone kernel and the lean MLP's forward and backward, the plain LoRA branch's gradients equal to
    autograd through that mask, and, at Qwen2-VL-7B's widths and 16k tokens, a LoRA layer's forward + backward
    faster than with torch's stored mask (the path it replaced)."""
    from ocrtune.models import lora_addmm, triton_kernels
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (3584, 18944):
        x = torch.randn(4096, n, device="cuda", generator=g).to(torch.bfloat16)
        # the mask in float32 (its scale 1/0.95 unrounded): the kernel scales in float32 and rounds once to bf16
        mask = triton_kernels.dropout(torch.ones(x.shape, device="cuda"), 0.05, 123)
        keep = (mask > 0).double().mean().item()
        assert abs(keep - 0.95) < 5 * (0.95 * 0.05 / x.numel()) ** 0.5, keep
        assert torch.equal(triton_kernels.dropout(x, 0.05, 123), (x.float() * mask).to(torch.bfloat16))
        h, _, hd = triton_kernels.swiglu_forward(x, x, torch.bfloat16, False, 0.05, 123)
        assert torch.equal(hd != 0, (h != 0) & (mask != 0))
        _, _, hb = triton_kernels.swiglu_backward(torch.ones_like(x), x, x, None, None,
                                                  (torch.bfloat16, torch.bfloat16), torch.bfloat16, 0.05, 123)
        assert torch.equal(hb != 0, (h != 0) & (mask != 0))
    leaves = [torch.randn(s, device="cuda", generator=g, dtype=torch.float32).requires_grad_()
              for s in ((512, 640), (512, 3584), (8, 3584), (640, 8))]
    out = lora_addmm._LoraAddmm.apply(*leaves, 0.5, 0.3, 99, torch.float32, False)
    kept = triton_kernels.dropout(torch.ones_like(leaves[1]), 0.3, 99)
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = ref_leaves[0] + 0.5 * ((ref_leaves[1] * kept) @ ref_leaves[2].t()) @ ref_leaves[3].t()
    assert rel(out, ref) <= 1e-5
    for got, want in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(ref.sum(), ref_leaves)):
        assert rel(got, want) <= 1e-5
    times = {}
    x = torch.randn(16384, 18944, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    result = torch.randn(16384, 3584, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(8, 18944, device="cuda", requires_grad=True)
    b = torch.randn(3584, 8, device="cuda", requires_grad=True)
    usable = triton_kernels.usable
    for name, on in (("torch mask", False), ("kernel", True), ("torch mask ", False), ("kernel ", True)):
        triton_kernels.usable = lambda *t, fp8=False, on=on: on and usable(*t, fp8=fp8)
        try:
            for i in range(4):
                if i == 1:
                    torch.cuda.synchronize()
                    start = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start[0].record()
                y = lora_addmm.lora_addmm(result, x, a, b, 4.0, p=0.05)
                torch.autograd.grad(y.float().sum(), (x, a, b))
            start[1].record()
            torch.cuda.synchronize()
        finally:
            triton_kernels.usable = usable
        times[name.strip()] = min(times.get(name.strip(), 1e9), start[0].elapsed_time(start[1]) / 3)
    print(f"dropout LoRA layer at 16384 x 18944, forward + backward: {times}")
    assert times["kernel"] < times["torch mask"], times


def test_fp8_scaled_mm_matches_the_emulated_float8_math():
    """`torch._scaled_mm` (float8 tensor cores, row-wise scales) against the same rounded operands multiplied
    in float32 (the CPU path): within bf16's output rounding (2^-8) and the accumulation order, with and
    without fast accumulation; and the forward/backward of `Fp8BaseLinear` against the CPU path's math."""
    from ocrtune.models.fp8_linear import Fp8BaseLinear, quantize_rows, scaled_mm
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, 3584, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(512, 3584, device="cuda", generator=g) / 60).to(torch.bfloat16)
    xq, xs = quantize_rows(x)
    wq, ws = quantize_rows(w)
    want = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t()
    for fast in (False, True):
        got = scaled_mm(xq, xs, wq, ws.view(-1), torch.bfloat16, fast_accum=fast)
        assert got.dtype == torch.bfloat16 and rel(got, want) <= 2 ** (-7 if fast else -8), (fast, rel(got, want))
    lin = torch.nn.Linear(3584, 512, bias=True, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(w)
    f8 = Fp8BaseLinear(lin)
    xr = x.clone().requires_grad_()
    y = f8(xr)
    assert rel(y, want + lin.bias.double()) <= 2 ** -7
    dy = torch.randn(1000, 512, device="cuda", generator=g).to(torch.bfloat16)
    (dx,) = torch.autograd.grad(y, xr, dy)
    gq, gs = quantize_rows(dy, f8.scale)
    assert rel(dx, (gq.double() * gs.double()) @ f8.weight_q.double()) <= 2 ** -7
    assert rel(dx, dy.double() @ w.double()) <= 2 ** -3  # each operand within 2^-4


def _cuda_ms(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def test_fp8_weight_transpose_is_exact_and_beats_the_strided_copy():
    """--fp8_base's backward turns every float8 base weight once a step: the tiled Triton copy gives torch's
    `t().contiguous()` bit for bit and, at Qwen2-VL-7B's MLP weight (18944 x 3584), takes less time."""
    from ocrtune.models import triton_kernels
    from ocrtune.models.fp8_linear import transposed
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in ((18944, 3584), (3584, 18944), (512, 3584), (77, 130)):
        w = torch.randn(shape, device="cuda", generator=g).to(torch.float8_e4m3fn)
        t = transposed(w)
        assert t.dtype == w.dtype and t.shape == shape[::-1]
        assert torch.equal(t.view(torch.uint8), w.t().contiguous().view(torch.uint8)), shape
    w = torch.randn(18944, 3584, device="cuda", generator=g).to(torch.float8_e4m3fn)
    times = {"torch": _cuda_ms(lambda: w.t().contiguous()), "triton": _cuda_ms(lambda: triton_kernels.transpose(w))}
    print(f"float8 transpose 18944 x 3584: {times} ms ({2 * w.numel() / times['triton'] / 1e6:.0f} GB/s)")
    assert times["triton"] < times["torch"], times


def test_liger_rope_runs_in_the_text_model_and_the_vit(monkeypatch):
    """transformers 5 rotates Qwen2-VL's q and k with the plain `apply_rotary_pos_emb` (the M-RoPE sections folded
    into cos/sin): after `apply_liger` that name is Liger's kernel (liger-kernel's own Qwen2-VL patch replaces a
    function nothing calls), and it agrees with the torch ops within bf16 rounding, forward and backward, on the
    model's own cos/sin."""
    _skip_without_liger(True)
    import transformers.models.qwen2_vl.modeling_qwen2_vl as m
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from ocrtune.models.patches.liger import folded_mrope_rope
    for name in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision"):  # restored after the test
        monkeypatch.setattr(m, name, getattr(m, name))
    assert folded_mrope_rope("qwen2_vl")
    assert m.apply_rotary_pos_emb._ocrtune_liger and m.apply_rotary_pos_emb_vision._ocrtune_liger
    cfg = m.Qwen2VLConfig().get_text_config()
    rotary = m.Qwen2VLRotaryEmbedding(cfg).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    pos = torch.randint(0, 400, (3, 1, 1000), device="cuda", generator=g)
    x = torch.zeros(1, device="cuda", dtype=torch.bfloat16)
    cos, sin = rotary(x, pos)
    q = torch.randn(1, 1000, 28, 128, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, 1000, 4, 128, device="cuda", generator=g).to(torch.bfloat16).transpose(1, 2)

    def torch_rope(q, k):
        c, s_ = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + m.rotate_half(q) * s_, k * c + m.rotate_half(k) * s_

    want = [t.double() for t in torch_rope(q.double(), k.double())]
    ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
    qt, kt = q.clone().requires_grad_(), k.clone().requires_grad_()
    got, ref = m.apply_rotary_pos_emb(ql * 1, kl * 1, cos, sin), torch_rope(qt, kt)
    assert m.apply_rotary_pos_emb is not liger_rotary_pos_emb  # Liger's kernel, launched on q's device
    for a, b, w in zip(got, ref, want):
        assert rel(a, w) <= max(2 * rel(b, w), bf16_rtol(2)), (rel(a, w), rel(b, w))
    dq = torch.randn(q.shape, device="cuda", generator=g).to(torch.bfloat16)
    dk = torch.randn(k.shape, device="cuda", generator=g).to(torch.bfloat16)
    gl = torch.autograd.grad(got, (ql, kl), (dq, dk))
    gt = torch.autograd.grad(ref, (qt, kt), (dq, dk))
    for a, b in zip(gl, gt):
        assert rel(a, b) <= bf16_rtol(4), rel(a, b)


@pytest.mark.parametrize("lean", [False, True], ids=["fused_lora", "lean_mlp"])
def test_fp8_base_model_trains_near_the_bf16_one(small, lean):
    """--fp8_base on the small model in bf16 (with the lean MLP, whose down projection then multiplies the float8
    weights itself): the loss within 2^-5 of the bf16 model's, and the LoRA gradients pointing the way the
    float32 reference's do (cosine >= 0.95 over all of them; the CPU test measures ~0.99 on the tiny model)."""
    from ocrtune.data.packing import pack
    d, samples = small
    reference = _lora_model(d, torch.float32)
    plain = _lora_model(d, torch.bfloat16, lean_mlp=lean)
    fp8 = _lora_model(d, torch.bfloat16, lean_mlp=lean, fp8_base=True)
    _set_lora([reference, plain, fp8], std=0.05)
    batch = _cuda(pack(samples, 0))
    _, _, g_ref = _loss_and_grads(reference, batch)
    l_plain, _, _ = _loss_and_grads(plain, batch)
    calls, scaled_mm = [], torch._scaled_mm

    def counted(*args, **kwargs):
        calls.append(1)
        return scaled_mm(*args, **kwargs)
    torch._scaled_mm = counted
    try:
        l_fp8, _, g_fp8 = _loss_and_grads(fp8, batch)
    finally:
        torch._scaled_mm = scaled_mm
    layers = fp8.config.get_text_config().num_hidden_layers
    assert len(calls) == 2 * 7 * layers  # forward and backward of q k v o gate up down: float8 tensor cores ran
    assert abs(l_fp8 - l_plain) <= 2 ** -5 * abs(l_plain), (l_fp8, l_plain)
    keys = sorted(g_ref)
    assert g_fp8.keys() == g_ref.keys() and keys
    cos = torch.nn.functional.cosine_similarity(torch.cat([g_ref[k].flatten() for k in keys]),
                                                torch.cat([g_fp8[k].flatten() for k in keys]), dim=0)
    assert cos >= 0.95, float(cos)


# ---------------------------------------------------------------- packed vs padded

@pytest.mark.parametrize("liger", [False, True], ids=["stock_kernels", "liger"])
def test_packed_vs_padded_loss_and_grads(small, liger):
    """A packed row (varlen attention in the language model and the ViT) computes the padded batch's loss
    and LoRA gradients: the loss within a bf16 rounding on each path, the gradients as accurate as the
    padded path's against a float32 reference of the same weights (worst and median over the tensors)."""
    from ocrtune.data.packing import pack
    from ocrtune.models.patches.liger import liger_fused_ce
    from ocrtune.models.template import collate
    _skip_without_liger(liger)
    d, samples = small
    model = _lora_model(d, torch.bfloat16, liger=liger)
    reference = _lora_model(d, torch.float32)
    _set_lora([model, reference])
    fused_ce = liger_fused_ce() if liger else None
    padded, packed = _cuda(collate(samples, 0)), _cuda(pack(samples, 0))
    l_ref, n_ref, g_ref = _loss_and_grads(reference, padded)
    l_pad, n_pad, g_pad = _loss_and_grads(model, padded, fused_ce)
    l_pack, n_pack, g_pack = _loss_and_grads(model, packed, fused_ce)
    assert n_pad == n_pack == n_ref > 0 and g_pad.keys() == g_pack.keys() == g_ref.keys() and len(g_ref) > 0
    assert abs(l_pack - l_pad) / abs(l_pad) <= bf16_rtol(2)
    assert abs(l_pad - l_ref) / abs(l_ref) <= bf16_rtol(2 * 2)  # sanity: the reference is the same model
    med_pad, worst_pad = _grad_errors(g_pad, g_ref)
    med_pack, worst_pack = _grad_errors(g_pack, g_ref)
    assert worst_pack <= 1.5 * worst_pad + bf16_rtol(1), (worst_pack, worst_pad)
    assert med_pack <= 1.5 * med_pad + bf16_rtol(1), (med_pack, med_pad)
    assert bool(getattr(model.base_model.model.model.visual, "_ocrtune_varlen", False))


def test_modules_to_save_trains_the_tied_embeddings_in_bf16(small):
    """--modules_to_save embed_tokens on the GPU path (bf16, packed rows, Liger's fused cross-entropy where it is
    installed; last in the file, as Liger patches the process): the trained copy is lm_head too, and its gradient
    (input lookups plus output logits) is as accurate packed as padded against a float32 reference."""
    from ocrtune.data.packing import pack
    from ocrtune.models.patches.liger import liger_fused_ce, liger_unavailable_reason
    from ocrtune.models.template import collate
    liger = liger_unavailable_reason() is None
    d, samples = small
    model = _lora_model(d, torch.bfloat16, liger=liger, modules_to_save=["embed_tokens"])
    reference = _lora_model(d, torch.float32, modules_to_save=["embed_tokens"])
    _set_lora([model, reference])
    copy_ = model.get_input_embeddings().modules_to_save["default"].weight
    assert copy_.requires_grad and model.get_output_embeddings().weight is copy_
    fused_ce = liger_fused_ce() if liger else None
    padded, packed = _cuda(collate(samples, 0)), _cuda(pack(samples, 0))
    *_, g_ref = _loss_and_grads(reference, padded)
    *_, g_pad = _loss_and_grads(model, padded, fused_ce)
    *_, g_pack = _loss_and_grads(model, packed, fused_ce)
    key = next(k for k in g_ref if "embed_tokens.modules_to_save" in k)
    assert g_pack[key].abs().sum() > 0 and torch.isfinite(g_pack[key]).all()
    assert rel(g_pack[key], g_ref[key]) <= 1.5 * rel(g_pad[key], g_ref[key]) + bf16_rtol(1)



def test_relora_fold_on_bf16_weights_keeps_the_loss(small):
    """--relora_steps on the GPU path: the recipe's LoRA targets (language model and vision tower, the patch
    embedding's conv included) over bf16 weights, folded into them (one bf16 rounding of each weight): the loss stays
    as near a float32 reference of the unfolded model as the unfolded bf16 model is, plus a rounding."""
    from ocrtune.data.packing import pack
    from ocrtune.models.loading import load_model
    from ocrtune.train import relora
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import prepare_model
    d, samples = small
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "proj", "fc1", "fc2"]
    models = [prepare_model(load_model(d, dtype, "sdpa"), SftArgs(lora_dropout=0.0, lora_rank=16, lora_alpha=32,
                                                                   target_modules=targets, packing=True)).cuda()
              for dtype in (torch.float32, torch.bfloat16)]
    reference, model = models
    _set_lora(models, std=0.05)
    batch = _cuda(pack(samples, 0))
    l_ref, *_ = _loss_and_grads(reference, batch)
    l_before, *_ = _loss_and_grads(model, batch)
    bases = {k: v.clone() for k, v in relora.base_overlay(model).items()}
    assert any("patch_embed" in k for k in bases)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], fused=True)
    assert relora.fold_and_restart(model, opt, seed=1) == len(bases)
    after = relora.base_overlay(model)
    assert all(not torch.equal(after[k], bases[k]) for k in bases)
    assert all(not p.any() for n, p in model.named_parameters() if "lora_B" in n)
    l_after, *_ = _loss_and_grads(model, batch)
    assert abs(l_after - l_ref) <= 1.5 * abs(l_before - l_ref) + bf16_rtol(1) * abs(l_ref), (l_after, l_before, l_ref)


def test_memory_plan_picks_and_refuses_on_the_gpu(small, tmp_path, capsys, monkeypatch):
    """With no recompute or lean-MLP flag a LoRA run plans its own (one line), trains with it and checks it in
    its first steps; a card too small for the longest step is refused at set-up, before any step."""
    from ocrtune.data.registry import SAMPLE_DIR
    from ocrtune.errors import UserError
    from ocrtune.train.args import SftArgs
    from ocrtune.train.data import parquet_rows, rows_data
    from ocrtune.train.trainer import SftRun
    d, _ = small
    rows = parquet_rows(SAMPLE_DIR / "train.parquet", limit=24)

    def args(out):
        return SftArgs(model=str(d), dataset=["rows"], max_steps=3, packing=True, packing_tokens=4096,
                       output_dir=str(tmp_path / out), report_to=["none"], eval_steps=10**6, save_steps=10**6)
    run = SftRun(args("a"), data=rows_data(rows))
    err = capsys.readouterr().err
    # the small preset at 4,096 tokens fits any GPU without recompute
    assert "memory plan: --lean_mlp true --recompute_layers 0 (of 6)" in err, err
    assert run.args.lean_mlp is True and run.args.recompute_layers == 0 and run.plan.fits
    run.train()
    assert run._plan_checks == 2
    from ocrtune.train import memory_plan
    total = torch.cuda.memory_allocated() + 2**30  # a 1 GiB card beside what is already held
    monkeypatch.setattr(memory_plan, "card_memory", lambda device: total)
    with pytest.raises(UserError, match="longest micro-batch"):
        SftRun(dataclasses.replace(args("b"), packing_tokens=2**20), data=rows_data(rows))
