"""The lean MLP's fused Triton kernels (ocrtune/models/triton_kernels.py) on the CPU, through Triton's
interpreter (TRITON_INTERPRET=1, which must be set before Triton is imported: the checks run in a child
process, this file run as a script). Compared with the torch ops they replace (`swiglu_down_lora`'s CPU
path) and with float64 math at the kept values. On CUDA, tests/test_cuda.py runs them compiled.

The interpreter converts float32 to float8 wrongly at the top of a binade (127.2 -> 64, where the GPU's
`cvt.rn.satfinite` and torch give 128), and to bfloat16 by truncation, so here the float8 values the kernel kept are only used, not
checked against torch's rounding; the row scales are checked exactly, and test_cuda checks the values."""
import os
import subprocess
import sys

import pytest
import torch


def test_fused_swiglu_kernels_match_the_torch_ops_in_the_interpreter():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's ocrtune, not an install's
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    run = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.strip().endswith("all checks passed"), run.stdout[-2000:]


def _inputs(dtype, rows=6, n=2500, out=48, r=4):
    """n over the kernels' 2048-wide block: a row takes two passes, the second partly masked."""
    g = torch.Generator().manual_seed(1)
    gate = torch.randn(2, rows // 2, n, generator=g) * 3
    gate[0, 1] = 0.0  # a zero row: scale stays finite
    up = torch.randn(2, rows // 2, n, generator=g)
    w = torch.randn(out, n, generator=g) / n ** 0.5
    a, b = torch.randn(r, n, generator=g) / n ** 0.5, torch.randn(out, r, generator=g) * 0.1
    return [t.to(dtype) for t in (gate, up, w, a, b)]


def _run(fused: bool, dtype, p=0.0, fp8=False):
    """The lean MLP tail's output and gradients, through the kernels or the torch ops; with dropout the torch ops
    take the kernels' mask (drawn by `triton_kernels.dropout` over ones), so the two must agree."""
    from ocrtune.models import lora_addmm, triton_kernels

    gate, up, w, a, b = (t.clone().requires_grad_(t.dim() == 3 or t.shape[0] != 48 or t.shape[1] == 4)
                         for t in _inputs(dtype))
    w.requires_grad_(False)
    usable, mask_of = triton_kernels.usable, lora_addmm._mask_of
    lora_addmm._mask_of = lambda shape, dt, device, p, seed: triton_kernels.dropout(
        torch.ones(shape, dtype=dt), p, seed).view(shape)
    triton_kernels.usable = lambda *t, fp8=False: fused
    try:  # the backward too: it draws the mask again
        out = lora_addmm._SwigluDownLora.apply(gate, up, w, None, a, b, 0.5, p, 7, dtype, fp8)
        grads = torch.autograd.grad((out.double() * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum(),
                                    (gate, up, a, b))
    finally:
        triton_kernels.usable, lora_addmm._mask_of = usable, mask_of
    return out, grads


def _checks():
    from ocrtune.models import triton_kernels
    from ocrtune.models.fp8_linear import quantize_rows_torch as fp8_rows, quantize_rows_torch
    from ocrtune.models.lora_addmm import from_fp8_rows

    assert triton_kernels.usable(torch.zeros(1)), "the interpreter is not on"
    # 1. float32, with and without dropout: the kernels against the torch ops, float32 rounding apart
    for p in (0.0, 0.3):
        (o1, g1), (o0, g0) = _run(True, torch.float32, p), _run(False, torch.float32, p)
        assert torch.allclose(o1, o0, rtol=1e-5, atol=1e-5), (p, (o1 - o0).abs().max())
        for x, y in zip(g1, g0):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-5 * y.abs().max()), (p, (x - y).abs().max())
    # 2. float8: the same forward; the scales are fp8_rows's; the backward is the math at the kept values
    gate, up = _inputs(torch.float32)[:2]
    h, (gq, gs, uq, us), _ = triton_kernels.swiglu_forward(gate, up, torch.float32, True)
    assert torch.equal(gs, fp8_rows(gate)[1]) and torch.equal(us, fp8_rows(up)[1])
    assert torch.equal(h, triton_kernels.swiglu_forward(gate, up, torch.float32, False)[0])
    cols = torch.rand(gate.shape[-1], generator=torch.Generator().manual_seed(4)) + 0.5
    for col in (None, cols):  # --fp8_base's row quantizer (dy times W's scales per column)
        q, sc = triton_kernels.quantize_rows(gate, col)
        want = quantize_rows_torch(gate, col)[1]
        assert q.shape == (6, 2500) and torch.equal(sc, want)
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(2))
    dg, du, h2 = triton_kernels.swiglu_backward(dh, gq, uq, gs, us, (torch.float32, torch.float32), torch.float32)
    G, U, D = from_fp8_rows(gq, gs, torch.float64), from_fp8_rows(uq, us, torch.float64), dh.double()
    sig = torch.sigmoid(G)
    for got, want in ((du, D * G * sig), (dg, D * U * sig * (1 + G * (1 - sig))), (h2, G * sig * U)):
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6 * want.abs().max()), (got.double() - want).abs().max()
    assert not du[1].any() and bool(dg.isfinite().all())  # the zero gate row: silu(0) = 0, its scale finite
    # 3. bfloat16: each output within one bfloat16 step (2^-7 relative) of the math on the same inputs (the GPU
    #    rounds to nearest, 2^-9; the interpreter truncates)
    gate, up = _inputs(torch.bfloat16)[:2]
    h = triton_kernels.swiglu_forward(gate, up, torch.bfloat16, False)[0]
    want = (torch.nn.functional.silu(gate.double()) * up.double()).view(h.shape)
    assert bool(((h.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-6).all())
    dh = torch.randn(h.shape, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    dg, du, _ = triton_kernels.swiglu_backward(dh, gate, up, None, None, (torch.bfloat16, torch.bfloat16), torch.bfloat16)
    G, U, D = gate.double().view(h.shape), up.double().view(h.shape), dh.double()
    sig = torch.sigmoid(G)
    for got, want in ((du, D * G * sig), (dg, D * U * sig * (1 + G * (1 - sig)))):
        assert bool(((got.double() - want).abs() <= 2 ** -7 * want.abs() + 1e-5).all())
    _dropout_checks()
    # 4. the LoRA path's input gradient added inside the backward kernel: as adding dropout(dz @ A) to dh first
    gate, up = _inputs(torch.float32)[:2]
    g = torch.Generator().manual_seed(11)
    base, dz = torch.randn(6, 2500, generator=g), torch.randn(6, 4, generator=g)
    a = torch.randn(4, 2500, generator=g) / 50
    for p in (0.0, 0.3):
        lora = triton_kernels.dropout(dz @ a, p, 21) if p else dz @ a
        want = triton_kernels.swiglu_backward(base + lora, gate, up, None, None, (torch.float32,) * 2, torch.float32, p, 21)
        got = triton_kernels.swiglu_backward(base, gate, up, None, None, (torch.float32,) * 2, torch.float32, p, 21, (dz, a))
        for x, y in zip(got, want):
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-5 * y.abs().max()), (p, (x - y).abs().max())
    # 5. --fp8_base's weight transpose: a tiled copy, blocks cut at both edges
    w = torch.randint(0, 256, (300, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    assert torch.equal(triton_kernels.transpose(w), w.t().contiguous())
    w8 = torch.randn(70, 130, generator=torch.Generator().manual_seed(10)).to(torch.float8_e4m3fn)
    t8 = triton_kernels.transpose(w8)
    assert t8.dtype == torch.float8_e4m3fn and torch.equal(t8.view(torch.uint8), w8.t().contiguous().view(torch.uint8))
    print("all checks passed")


def _dropout_checks():
    """The LoRA dropout drawn inside the kernels: its rate and values, one mask for one (seed, shape) in every
    kernel (the standalone one, the lean MLP's forward and backward), and the plain LoRA branch through it equal
    to autograd through the same mask."""
    from ocrtune.models import lora_addmm, triton_kernels

    x = torch.randn(64, 2500, generator=torch.Generator().manual_seed(5))
    y, again, other = (triton_kernels.dropout(x, 0.25, s) for s in (11, 11, 12))
    mask = triton_kernels.dropout(torch.ones_like(x), 0.25, 11)
    assert torch.equal(y, again) and not torch.equal(y, other)
    assert mask.unique().tolist() == [0.0, torch.tensor(1 / 0.75).item()]
    keep = (mask > 0).double().mean().item()
    assert abs(keep - 0.75) < 4 * (0.75 * 0.25 / x.numel()) ** 0.5, keep  # 4 standard deviations
    assert abs((mask[:, :2048] > 0).double().mean().item() - (mask[:, 2048:] > 0).double().mean().item()) < 0.02
    assert torch.equal(y, x * mask)  # float32: one rounding either way
    assert not torch.equal(mask[:, 2048:2500] > 0, mask[:, :452] > 0)  # the block's start is in the counter
    nan = x.clone()
    nan[mask == 0] = float("nan")  # dropped NaNs stay NaN (times 0), as with torch's mask
    assert bool(triton_kernels.dropout(nan, 0.25, 11)[mask == 0].isnan().all())
    cols = (mask > 0).double().mean(0)  # no column or row pattern: each within 5 standard deviations of 0.75
    assert bool(((cols - 0.75).abs() < 5 * (0.75 * 0.25 / 64) ** 0.5).all())
    # the lean MLP's kernels draw the same mask for the same (seed, shape)
    gate, up = (torch.randn(64, 2500, generator=torch.Generator().manual_seed(k)) for k in (6, 7))
    h, _, hd = triton_kernels.swiglu_forward(gate, up, torch.float32, False, 0.25, 11)
    assert torch.equal(hd, triton_kernels.dropout(h, 0.25, 11))
    _, _, hd2 = triton_kernels.swiglu_backward(torch.ones_like(h), gate, up, None, None,
                                               (torch.float32, torch.float32), torch.float32, 0.25, 11)
    assert torch.allclose(hd2, hd, rtol=1e-6, atol=1e-6)
    # and with float8 gate/up kept (--lean_mlp_fp8): the same mask over the forward's and the backward's h
    h8, kept, hd8 = triton_kernels.swiglu_forward(gate, up, torch.float32, True, 0.25, 11)
    assert torch.equal(hd8, triton_kernels.dropout(h8, 0.25, 11))
    _, _, h8b = triton_kernels.swiglu_backward(torch.ones_like(h8), kept[0], kept[2], kept[1], kept[3],
                                               (torch.float32, torch.float32), torch.float32)
    _, _, hd8b = triton_kernels.swiglu_backward(torch.ones_like(h8), kept[0], kept[2], kept[1], kept[3],
                                                (torch.float32, torch.float32), torch.float32, 0.25, 11)
    assert torch.equal(hd8b, triton_kernels.dropout(h8b, 0.25, 11))
    # the plain LoRA branch (q/k/v/o, gate/up) against autograd with that mask kept
    g = torch.Generator().manual_seed(8)
    result, xs = torch.randn(3, 20, 48, generator=g), torch.randn(3, 20, 2500, generator=g)
    a, b = torch.randn(4, 2500, generator=g) / 50, torch.randn(48, 4, generator=g) / 2
    leaves = [t.clone().requires_grad_() for t in (result, xs, a, b)]
    out = lora_addmm._LoraAddmm.apply(*leaves, 0.5, 0.3, 99, torch.float32, False)
    kept = triton_kernels.dropout(torch.ones_like(xs), 0.3, 99).view(xs.shape)
    ref_leaves = [t.clone().requires_grad_() for t in (result, xs, a, b)]
    ref = ref_leaves[0] + 0.5 * ((ref_leaves[1] * kept) @ ref_leaves[2].t()) @ ref_leaves[3].t()
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    w = torch.linspace(-1, 1, out.numel()).view(out.shape)
    for got, want in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), ref_leaves)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


if __name__ == "__main__":
    _checks()
