"""--fp8_base: a LoRA model's frozen base linears in float8, multiplied on float8 tensor cores.

LoRA only reads the base weights: forward y = x W^T, backward dx = dy W, never a weight gradient. Kept as
float8 e4m3 with one float32 scale per output channel, W takes half its bf16 bytes (about 6 GB less for
Qwen2-VL-7B's language model), and both products run as `torch._scaled_mm` with row-wise scales, where
Hopper's float8 tensor cores do twice bf16's work per second. The other operand is quantized per row (per
token) on the fly: x forward; dy times W's scales backward (folded in, so that W's scale runs along the
contracted dimension). Nothing more is kept for backward; the adapters, their inputs and everything else
stay in bf16.

Numerics: each operand is rounded to e4m3 (3 mantissa bits: within 2^-4 of itself), products accumulate in
float32 (forward with fast accumulation, as torchao's float8 training does; backward without). The
language model's layers only: the vision tower runs frozen and without gradients, and lm_head is not a
LoRA target. Where float8 matmuls cannot run (CPU, another output dtype) the same rounded operands are
multiplied in float32: the tests check that path's math on the CPU and `_scaled_mm` against it on CUDA.
"""
from __future__ import annotations

import torch
from torch import nn

from ocrtune.models import triton_kernels

FP8, FP8_MAX = torch.float8_e4m3fn, 448.0


def quantize_rows(t: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` [..., n], times `col_scale` [n] per column if given, as ([rows, n] e4m3, [rows, 1] float32 scales)
    with each row's amax at 448: one Triton kernel on CUDA, `quantize_rows_torch` elsewhere (same values)."""
    if triton_kernels.usable(t, fp8=True):
        return triton_kernels.quantize_rows(t, col_scale)
    return quantize_rows_torch(t, col_scale)


def quantize_rows_torch(t: torch.Tensor, col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` in torch ops. A kept value is within 2^-4 of itself (3 mantissa bits, round to nearest)
    or 2^-10 of its row's scale (subnormals). Scaling runs in float32: in float16 1/scale overflows for rows
    under ~0.007."""
    t2 = t.detach().reshape(-1, t.shape[-1]).float()
    if col_scale is not None:
        t2 = t2 * col_scale
    # times float32(1/448), not / 448: CUDA's division by a scalar multiplies by its reciprocal, the CPU's
    # divides; this way both devices (and the Triton kernels) give the same scales
    scale = t2.abs().amax(-1, keepdim=True).mul_(1.0 / FP8_MAX).clamp_(min=torch.finfo(torch.float32).tiny)
    # clamp: the rounded 1/scale can lift the row's amax just past 448, and e4m3fn has no infinity
    return (t2 * scale.reciprocal()).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def scaled_mm(aq: torch.Tensor, a_scale: torch.Tensor, bq: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """(aq * a_scale) @ (bq * b_scale[:, None]).T for aq [m, k], bq [n, k] in e4m3, a_scale [m, 1], b_scale [n]:
    float8 tensor cores on CUDA with a bf16 output, else the same operands multiplied in float32."""
    if aq.is_cuda and out_dtype == torch.bfloat16:
        return torch._scaled_mm(aq, bq.t(), scale_a=a_scale, scale_b=b_scale.view(1, -1), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return ((aq.float() * a_scale) @ (bq.float() * b_scale[:, None]).t()).to(out_dtype)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight_q, weight_scale, bias, dtype: torch.dtype):
        xq, xs = quantize_rows(x)
        y = scaled_mm(xq, xs, weight_q, weight_scale, dtype, fast_accum=True)
        if bias is not None:
            y = y + bias.to(dtype)
        ctx.save_for_backward(weight_q, weight_scale)
        ctx.x_meta = (x.shape, x.dtype)
        # not a view of y (as aten's own linear folds its rows back): a LoRA layer adds its update into this output in
        # place, which autograd forbids on a view made inside a custom Function
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], y.shape[-1]))

    @staticmethod
    def backward(ctx, grad):
        weight_q, weight_scale = ctx.saved_tensors
        shape, dtype = ctx.x_meta
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_input(grad, weight_q, weight_scale, grad.dtype).view(shape).to(dtype)
        return grad_x, None, None, None, None


def grad_input(grad: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dy [.., out] @ W as [rows, in]: W's per-output scale folded into dy's columns, dy quantized per row,
    then times W's float8 values transposed (a copy, made again each step: `_scaled_mm` takes its second
    operand column-major, and keeping W's transpose too would hold the float8 weights twice)."""
    gq, gs = quantize_rows(grad, weight_scale)
    ones = torch.ones(weight_q.shape[1], dtype=torch.float32, device=weight_q.device)
    return scaled_mm(gq, gs, transposed(weight_q), ones, dtype)


def transposed(w: torch.Tensor) -> torch.Tensor:
    """`w.t().contiguous()`: one tiled Triton copy on CUDA (torch's strided copy of float8 runs at a tenth of the
    memory's speed)."""
    if triton_kernels.usable(w) and w.element_size() == 1:
        return triton_kernels.transpose(w)
    return w.t().contiguous()


class Fp8BaseLinear(nn.Module):
    """A frozen `nn.Linear` kept as float8 e4m3 values with a float32 scale per output channel. Both are
    stored under integer views (uint8, int32) so that `model.to(dtype)` leaves them as they are."""

    def __init__(self, linear: nn.Linear, device: torch.device | None = None):
        super().__init__()
        w = linear.weight.detach().to(device)  # quantized where it will run (one kernel a weight on the GPU)
        q, s = quantize_rows(w)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", q.view(torch.uint8), persistent=False)
        self.register_buffer("weight_scale", s.view(-1).view(torch.int32), persistent=False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
            self.bias.data = self.bias.data.to(w.device)

    @property
    def weight_q(self) -> torch.Tensor:
        return self.weight_fp8.view(FP8)

    @property
    def scale(self) -> torch.Tensor:
        return self.weight_scale.view(torch.float32)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight_q.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        dev = x.device.type
        dtype = dtype or (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype)
        with torch.autocast(dev, enabled=False):
            return _Fp8Linear.apply(x, self.weight_q, self.scale, self.bias, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, float8 e4m3"


def float8_matmul_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `--fp8_base` can't run on `device` computing in `dtype` (None: it can; off CUDA the float8 products
    are emulated, which the CPU tests use). One tiny row-wise `_scaled_mm` is tried: capability alone does not
    say whether this torch build has the kernel."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return (f"--fp8_base needs float8 tensor cores (compute capability 8.9 or newer: Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(device)} has {major}.{minor}: drop --fp8_base")
    if dtype != torch.bfloat16:
        return f"--fp8_base multiplies into bfloat16 (row-wise float8 matmuls), not {dtype}: use --dtype bfloat16 or drop --fp8_base"
    try:
        a = torch.ones(16, 16, device=device).to(FP8)
        scale = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=scale, scale_b=scale.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError) as e:
        return f"--fp8_base: this torch {torch.__version__} has no row-wise float8 matmul on {torch.cuda.get_device_name(device)} ({str(e).splitlines()[0][:120]}): drop --fp8_base"
    return None


def fp8_base_linears(model: nn.Module, root: nn.Module, device: torch.device | None = None) -> int:
    """Replace the base layer of every PEFT LoRA `Linear` under `root` (a frozen `nn.Linear` whose sizes are
    multiples of 16, as float8 tensor cores need) with `Fp8BaseLinear`, its values on `device` (default: where
    the weight is); returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    n = 0
    for module in root.modules():
        base = getattr(module, "base_layer", None)
        if (isinstance(module, LoraLinear) and isinstance(base, nn.Linear) and not base.weight.requires_grad
                and base.in_features % 16 == 0 and base.out_features % 16 == 0):
            module.base_layer = Fp8BaseLinear(base, device)
            n += 1
    return n
