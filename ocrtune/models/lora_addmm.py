"""A LoRA branch added into its base layer's output, with dropout that keeps nothing for backward.

PEFT computes `base(x) + scaling * B(A(dropout(x)))`. For the backward pass autograd keeps the
dropped copy of `x` (for A's gradient) and the dropout mask: one extra [tokens, in_features] tensor
per LoRA layer, about 30 GiB at 16k tokens on Qwen2-VL-7B, while `x` itself is often kept anyway
(q, k and v share one input). Here the mask comes from a seeded generator and is drawn again in
backward, so only `x` (shared), the rank-r `A(dropout(x))` and the two small weights are kept. The
update is added in the GEMM's epilogue (`addmm`), as `--fused_lora` does. Same math as PEFT.
"""
from __future__ import annotations

import torch

from ocrtune.models import fp8_linear, triton_kernels


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """`x` with the dropout of `seed` applied: the same mask for every tensor of x's shape and device. On CUDA
    one Triton kernel draws it as it goes (nothing stored); elsewhere a seeded generator writes it."""
    if p <= 0:
        return x
    if triton_kernels.usable(x):
        return triton_kernels.dropout(x, p, seed).view(x.shape)
    return x * _mask_of(x.shape, x.dtype, x.device, p, seed)


def _mask_of(shape, dtype, device, p: float, seed: int) -> torch.Tensor:
    """The keep-mask scaled by 1/(1-p) off CUDA: the same for the same (shape, dtype, device, seed)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen).mul_(1.0 / (1.0 - p))


def _addmm(result, xd, a, b, scaling: float, dtype, inplace: bool = False):
    """(`result + scaling * xd @ a.T @ b.T` in `dtype`, and the rank-r `xd @ a.T`). With `inplace` (a `result` no
    one else reads) the update goes into `result` itself: out of place, the GEMM first copies all of `result` into
    its output (about 18 ms of a 7B step at 10k tokens on an H100)."""
    h = xd.reshape(-1, xd.shape[-1]).to(dtype) @ a.to(dtype).t()
    if inplace and result.dtype == dtype and result.is_contiguous():
        result.view(-1, result.shape[-1]).addmm_(h, b.to(dtype).t(), alpha=scaling)
        return result, h
    out = torch.addmm(result.reshape(-1, result.shape[-1]).to(dtype), h, b.to(dtype).t(), alpha=scaling)
    return out.view(result.shape), h


class _LoraAddmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, result, x, a, b, scaling: float, p: float, seed: int, dtype: torch.dtype, inplace: bool):
        with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit here
            # the adapters in the compute dtype once, kept for backward (rank-r: small), not cast again there
            a_, b_ = a.to(dtype), b.to(dtype)
            out, h = _addmm(result, _dropped(x, p, seed), a_, b_, scaling, dtype, inplace)
        if out is result:
            ctx.mark_dirty(result)
        ctx.save_for_backward(x, h, a_, b_)
        ctx.scaling, ctx.p, ctx.seed, ctx.dtype = scaling, p, seed, dtype
        ctx.result_dtype, ctx.ab_dtypes = result.dtype, (a.dtype, b.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, h, a, b = ctx.saved_tensors
        dt, s = ctx.dtype, ctx.scaling
        g = grad.reshape(-1, grad.shape[-1]).to(dt)
        dh = (g @ b) * s  # [tokens, r]
        grad_b = (g.t() @ h) * s if ctx.needs_input_grad[3] else None
        grad_a = grad_x = None
        if ctx.needs_input_grad[2]:
            grad_a = dh.t() @ _dropped(x, ctx.p, ctx.seed).reshape(-1, x.shape[-1]).to(dt)
        if ctx.needs_input_grad[1]:  # the dropout's gradient: the same mask over A's input gradient
            grad_x = _dropped((dh @ a).view(x.shape).to(x.dtype), ctx.p, ctx.seed).view(x.shape)
        grad_result = grad.to(ctx.result_dtype) if ctx.needs_input_grad[0] else None
        a_dtype, b_dtype = ctx.ab_dtypes
        return (grad_result, grad_x, None if grad_a is None else grad_a.to(a_dtype),
                None if grad_b is None else grad_b.to(b_dtype), None, None, None, None, None)


def lora_addmm(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
               p: float = 0.0, dtype: torch.dtype | None = None, inplace: bool = False) -> torch.Tensor:
    """`result + scaling * dropout_p(x) @ a.T @ b.T`, computed in `dtype` (default: result's dtype); with `inplace`
    (`result` a base layer's fresh output that nothing else reads or keeps for backward) into `result` itself.
    Under autograd the dropout mask is regenerated in backward instead of stored."""
    dtype = dtype or result.dtype
    inplace = inplace and not (result.is_leaf and result.requires_grad)  # autograd refuses writes into such a leaf
    if inplace and result._base is not None:
        # nn.Linear with a bias returns its 2-D addmm's rows viewed as 3-D: written through the view, autograd would
        # replay the write on the base (four full-size copies in backward) and torch.compile fails on it
        result = torch.ops.aten._unsafe_view(result, result.shape)
    if not torch.is_grad_enabled() or not (x.requires_grad or a.requires_grad or b.requires_grad or result.requires_grad):
        xd = torch.nn.functional.dropout(x, p, training=True) if p > 0 else x
        return _addmm(result, xd, a, b, scaling, dtype, inplace)[0]
    if p > 0:
        return _dropped_lora(result, x, a, b, float(scaling), float(p), dtype, inplace)
    return _LoraAddmm.apply(result, x, a, b, float(scaling), 0.0, 0, dtype, inplace)


def _seed() -> int:
    return int(torch.randint(0, 2 ** 62, (1,)).item())  # CPU generator: no device sync


# Eager under torch.compile: the seed is a new Python int each call, and a compiled region would specialize on it
# and compile again every step (tests/test_lora_addmm.py counts the frames)
@torch.compiler.disable
def _dropped_lora(result, x, a, b, scaling: float, p: float, dtype, inplace: bool):
    return _LoraAddmm.apply(result, x, a, b, scaling, p, _seed(), dtype, inplace)


@torch.compiler.disable
def _dropped_swiglu_lora(gate, up, weight, bias, a, b, scaling: float, p: float, dtype, fp8: bool):
    return _SwigluDownLora.apply(gate, up, weight, bias, a, b, scaling, p, _seed(), dtype, fp8)


# ---------------------------------------------------------------- SwiGLU MLP tail: down_proj(silu(gate) * up) + LoRA
#
# In a LoRA SwiGLU MLP the step keeps three [tokens, intermediate] tensors per layer for backward: gate and
# up (for the SiLU-multiply) and their product h (the down projection's LoRA input, for A's gradient).
# h is cheap to recompute from gate and up, so this keeps only those two: on Qwen2-VL-7B (intermediate
# 18944) that is 37 KB less per token and layer, about 16 GiB at 16k tokens without recomputation.
# The base weight is frozen (LoRA), so its gradient, which would need h, is never computed.

# --lean_mlp_fp8: gate and up are kept for backward as float8 e4m3 with one scale per token (row): half
# their bytes. A kept value then differs from the forward's by at most 2^-4 of itself (3 mantissa bits,
# round to nearest) or 2^-10 of its row's scale (subnormals); the forward is unchanged, the backward
# computes from those values. Scaling runs in float32: in float16 1/scale overflows for rows under ~0.007.
FP8, FP8_MAX = torch.float8_e4m3fn, 448.0


def fp8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` [..., n] as ([rows, n] float8 e4m3 values, [rows, 1] float32 scales), amax of each row at 448."""
    return fp8_linear.quantize_rows(t)


def from_fp8_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def _base_linear(h, weight, bias, dtype):
    """The frozen down projection: `weight` a tensor, or an `Fp8BaseLinear` (--fp8_base, its bias its own)."""
    if isinstance(weight, torch.Tensor):
        return torch.nn.functional.linear(h, weight.to(dtype), None if bias is None else bias.to(dtype))
    return weight(h, dtype=dtype)


def _base_grad(g, weight, dtype):
    """`g @ W`: the down projection's input gradient through its frozen base weight (a tensor, or float8)."""
    if isinstance(weight, torch.Tensor):
        return g @ weight.to(dtype)
    return fp8_linear.grad_input(g, weight.weight_q, weight.scale, dtype)


def _plus_base_grad(lora_dh, g, weight, dtype):
    """`lora_dh + g @ W`: the down projection's input gradient, its LoRA and base paths."""
    if isinstance(weight, torch.Tensor):
        return torch.addmm(lora_dh, g, weight.to(dtype))
    return lora_dh + fp8_linear.grad_input(g, weight.weight_q, weight.scale, dtype)


def _swiglu_down(gate, up, weight, bias, dtype):
    """(h = silu(gate) * up, the base layer's output linear(h, weight, bias)), in `dtype`."""
    h = torch.nn.functional.silu(gate.to(dtype)) * up.to(dtype)
    return h, _base_linear(h, weight, bias, dtype)


def _masked(t, mask):
    return t * mask if mask is not None else t


class _SwigluDownLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, weight, bias, a, b, scaling: float, p: float, seed: int, dtype: torch.dtype,
                fp8: bool = False):
        fused = triton_kernels.usable(gate, up, fp8=fp8)  # one Triton kernel for the element-wise work, else torch ops
        with torch.autocast(gate.device.type, enabled=False):
            if fused:  # h, and its dropped copy for the LoRA branch, in one pass
                h, q, hd = triton_kernels.swiglu_forward(gate, up, dtype, fp8, p, seed)
                h = h.view(*gate.shape[:-1], h.shape[-1])
                hd = h if hd is None else hd.view(h.shape)
                result = _base_linear(h, weight, bias, dtype)
            else:
                h, result = _swiglu_down(gate, up, weight, bias, dtype)
                q = (*fp8_rows(gate), *fp8_rows(up)) if fp8 else None
                hd = h * _mask_of(h.shape, h.dtype, h.device, p, seed) if p > 0 else h
            a_, b_ = a.to(dtype), b.to(dtype)  # cast once, kept for backward (as _LoraAddmm does)
            out, z = _addmm(result, hd, a_, b_, scaling, dtype, inplace=True)  # result: the base output made here
        tensor_weight = isinstance(weight, torch.Tensor)
        ctx.save_for_backward(*(q if fp8 else (gate, up)), z, weight if tensor_weight else None, a_, b_)
        ctx.ab_dtypes = (a.dtype, b.dtype)
        ctx.fp8_weight = None if tensor_weight else weight  # --fp8_base's frozen float8 layer: kept by the model anyway
        ctx.scaling, ctx.p, ctx.seed, ctx.dtype, ctx.has_bias, ctx.fp8 = scaling, p, seed, dtype, bias is not None, fp8
        ctx.fused = fused
        ctx.gate_meta, ctx.up_meta = (gate.shape, gate.dtype, gate.device), (up.shape, up.dtype)
        return out

    @staticmethod
    def backward(ctx, grad):
        dt, s = ctx.dtype, ctx.scaling
        if ctx.fp8:
            gk, gs, uk, us, z, weight, a, b = ctx.saved_tensors
        else:
            (gk, uk, z, weight, a, b), gs, us = ctx.saved_tensors, None, None
        weight = ctx.fp8_weight if ctx.fp8_weight is not None else weight
        (gate_shape, gate_dtype, device), (up_shape, up_dtype) = ctx.gate_meta, ctx.up_meta
        g = grad.reshape(-1, grad.shape[-1]).to(dt)
        dz = (g @ b) * s                                          # [tokens, r]
        grad_b = (g.t() @ z) * s if ctx.needs_input_grad[5] else None
        if ctx.fused:  # the mask drawn again inside the kernels
            if a.shape[0] <= triton_kernels.FUSED_LORA_RANK:  # the LoRA path's dh added inside the kernel
                dh, lora = _base_grad(g, weight, dt), (dz, a)
            else:
                lora_dh = dz @ a
                dh, lora = _plus_base_grad(triton_kernels.dropout(lora_dh, ctx.p, ctx.seed) if ctx.p > 0 else lora_dh,
                                           g, weight, dt), None
                del lora_dh
            grad_gate, grad_up, hd = triton_kernels.swiglu_backward(dh, gk, uk, gs, us, (gate_dtype, up_dtype), dt,
                                                                    ctx.p, ctx.seed, lora)
            del dh
            grad_a = dz.t() @ hd if ctx.needs_input_grad[4] else None
            del hd
            grad_gate, grad_up = grad_gate.view(gate_shape), grad_up.view(up_shape)
        else:
            mask = _mask_of(gate_shape, gate_dtype, device, ctx.p, ctx.seed).reshape(-1, gate_shape[-1]) if ctx.p > 0 else None
            if ctx.fp8:
                gate2, up2 = from_fp8_rows(gk, gs, dt), from_fp8_rows(uk, us, dt)
            else:
                gate2, up2 = gk.reshape(-1, gk.shape[-1]).to(dt), uk.reshape(-1, uk.shape[-1]).to(dt)
            sig = torch.sigmoid(gate2)
            silu = gate2 * sig
            grad_a = None
            if ctx.needs_input_grad[4]:
                hd = _masked(silu * up2, mask)                    # h, recomputed
                grad_a = dz.t() @ hd
                del hd
            dh = _plus_base_grad(_masked(dz @ a, mask), g, weight, dt)  # LoRA + base paths
            grad_up = (dh * silu).view(up_shape).to(up_dtype)
            grad_gate = (dh * up2 * (sig * (1 + gate2 * (1 - sig)))).view(gate_shape).to(gate_dtype)
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        a_dtype, b_dtype = ctx.ab_dtypes
        return (grad_gate, grad_up, None, grad_bias, None if grad_a is None else grad_a.to(a_dtype),
                None if grad_b is None else grad_b.to(b_dtype), None, None, None, None, None)


def swiglu_down_lora(gate: torch.Tensor, up: torch.Tensor, weight, bias: torch.Tensor | None,
                     a: torch.Tensor, b: torch.Tensor, scaling: float, p: float = 0.0,
                     dtype: torch.dtype | None = None, fp8: bool = False) -> torch.Tensor:
    """`linear(silu(gate) * up, weight, bias) + scaling * dropout_p(silu(gate) * up) @ a.T @ b.T` in `dtype`,
    with a frozen `weight`: a tensor, or an `fp8_linear.Fp8BaseLinear` (--fp8_base; it adds its own bias, so
    `bias` is then None). Under autograd only gate, up and the rank-r product are kept (gate and up as
    float8 with `fp8`: see `fp8_rows`); h and the dropout mask are made again in backward."""
    dtype = dtype or gate.dtype
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("swiglu_down_lora needs a frozen base weight (LoRA)")
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad or a.requires_grad or b.requires_grad):
        h, result = _swiglu_down(gate, up, weight, bias, dtype)
        hd = torch.nn.functional.dropout(h, p, training=True) if p > 0 else h
        return _addmm(result, hd, a, b, scaling, dtype, inplace=True)[0]
    if p > 0:
        return _dropped_swiglu_lora(gate, up, weight, bias, a, b, float(scaling), float(p), dtype, bool(fp8))
    return _SwigluDownLora.apply(gate, up, weight, bias, a, b, float(scaling), 0.0, 0, dtype, bool(fp8))
