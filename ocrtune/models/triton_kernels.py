"""Fused Triton kernels on CUDA: the lean SwiGLU MLP's (`--lean_mlp`, `--lean_mlp_fp8`), the LoRA dropout's
(`dropout`: mask drawn in the kernel) and the float8 row quantizer of `--fp8_base` (`quantize_rows`: a row's amax
and its e4m3 values in one kernel).

The lean MLP's element-wise work runs on [tokens, intermediate] tensors (18944 wide on Qwen2-VL-7B, about
300 MB each at 8k tokens). Written as separate torch ops (sigmoid, multiply, ..., float8 scaling), every op
is one more pass over such a tensor: about 9 GB of memory traffic per layer and step in the backward alone,
more with float8. Here each row is read once per kernel and the math runs in float32 registers:

  forward   gate, up -> h = silu(gate) * up  (and, with float8, gate and up as e4m3 + a float32 scale per row)
  backward  dh, gate, up -> d gate, d up, and h again (the down projection's LoRA input, for A's gradient)

The LoRA dropout's keep-mask is never stored: every kernel that needs it draws it again from (seed, row,
column) with Philox (`_uniform`, four numbers a call), so the forward's dropped input, the backward's and the
masked gradient agree bit for bit, where torch's `bernoulli_` writes a mask that the step then reads and
multiplies in separate passes (six passes over a [tokens, features] tensor a LoRA layer and step become two).

Used when Triton can run the tensors (CUDA); `lora_addmm.swiglu_down_lora` keeps its torch ops elsewhere
(CPU). Results agree with those ops up to rounding: one rounding to the output dtype here, one per op there.
`TRITON_INTERPRET=1` runs these kernels on the CPU (tests/test_triton_kernels.py).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch ops are used
    triton = None

# the kernels write float8 e4m3 (amax 448) with scales clamped to float32's smallest normal, 1.1754943508222875e-38
_BLOCK = 2048


def usable(*tensors: torch.Tensor, fp8: bool = False) -> bool:
    """Whether these kernels can run on `tensors`: Triton present and the tensors on CUDA (or the Triton
    interpreter on); with `fp8`, a GPU with float8 conversions (compute capability 8.9+: Triton's e4m3)."""
    import os

    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    if not all(t.is_cuda for t in tensors):
        return False
    return not fp8 or all(torch.cuda.get_device_capability(t.device) >= (8, 9) for t in tensors)


if triton is not None:

    @triton.jit
    def _uniform(seed, row, start, n, BLOCK: tl.constexpr):
        """BLOCK uniform floats in [0, 1) for columns start .. start + BLOCK of `row`: a function of (seed, row,
        column, n, BLOCK), so every kernel walking an n-wide row in _BLOCK-wide steps draws the same ones."""
        quarter = tl.arange(0, BLOCK // 4)
        r0, r1, r2, r3 = tl.rand4x(seed, row * (tl.cdiv(n, BLOCK) * (BLOCK // 4)) + start // 4 + quarter)
        return tl.interleave(tl.interleave(r0, r1), tl.interleave(r2, r3))

    @triton.jit
    def _drop(v, seed, row, start, n, p, scale, BLOCK: tl.constexpr):
        """`v` (float32, columns start .. start + BLOCK of `row`) with the dropout of `seed`: kept where the draw is
        at least p, times `scale` (1 / (1 - p)); dropped values times 0, as torch's mask does (NaN stays NaN)."""
        return v * tl.where(_uniform(seed, row, start, n, BLOCK) >= p, scale, 0.0)

    @triton.jit(do_not_specialize=["seed"])  # a new seed each call: Triton specializes 1 and multiples of 16
    def _dropout_kernel(x_ptr, y_ptr, n, seed, p, scale, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * n
        cols = tl.arange(0, BLOCK)
        for start in range(0, n, BLOCK):
            m = start + cols < n
            x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(y_ptr + base + start + cols, _drop(x, seed, row, start, n, p, scale, BLOCK).to(y_ptr.dtype.element_ty),
                     mask=m)

    @triton.jit(do_not_specialize=["seed"])
    def _forward_kernel(g_ptr, u_ptr, h_ptr, gq_ptr, gs_ptr, uq_ptr, us_ptr, hd_ptr, n, seed, p, scale,
                        FP8: tl.constexpr, DROP: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * n
        cols = tl.arange(0, BLOCK)
        if FP8:  # pass 1: each row's amax (the row is read again below, mostly from L2)
            gmax = tl.zeros([BLOCK], dtype=tl.float32)
            umax = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n, BLOCK):
                m = start + cols < n
                gmax = tl.maximum(gmax, tl.abs(tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)))
                umax = tl.maximum(umax, tl.abs(tl.load(u_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)))
            gs = tl.maximum(tl.max(gmax, axis=0) * (1.0 / 448.0), 1.1754943508222875e-38)  # as torch: times fl32(1/448)
            us = tl.maximum(tl.max(umax, axis=0) * (1.0 / 448.0), 1.1754943508222875e-38)
            tl.store(gs_ptr + row, gs)
            tl.store(us_ptr + row, us)
            g_inv = tl.math.div_rn(1.0, gs)  # IEEE division, as torch.reciprocal: the same float8 values
            u_inv = tl.math.div_rn(1.0, us)
        for start in range(0, n, BLOCK):
            m = start + cols < n
            g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            h = g * tl.sigmoid(g) * u
            tl.store(h_ptr + base + start + cols, h.to(h_ptr.dtype.element_ty), mask=m)
            if DROP:  # the LoRA branch's dropped input
                tl.store(hd_ptr + base + start + cols, _drop(h, seed, row, start, n, p, scale, BLOCK).to(hd_ptr.dtype.element_ty),
                         mask=m)
            if FP8:
                tl.store(gq_ptr + base + start + cols, tl.clamp(g * g_inv, -448.0, 448.0).to(tl.float8e4nv), mask=m)
                tl.store(uq_ptr + base + start + cols, tl.clamp(u * u_inv, -448.0, 448.0).to(tl.float8e4nv), mask=m)

    @triton.jit(do_not_specialize=["seed"])
    def _backward_kernel(dh_ptr, g_ptr, u_ptr, gs_ptr, us_ptr, dg_ptr, du_ptr, h_ptr, dz_ptr, a_ptr, n, seed, p, scale,
                         FP8: tl.constexpr, DROP: tl.constexpr, R: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * n
        cols = tl.arange(0, BLOCK)
        if FP8:
            gs = tl.load(gs_ptr + row)
            us = tl.load(us_ptr + row)
        for start in range(0, n, BLOCK):
            m = start + cols < n
            g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            if FP8:
                g = g * gs
                u = u * us
            dh = tl.load(dh_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            if R > 0:  # the LoRA path's input gradient dz @ A (rank R), through the forward's dropout, added here
                lora = tl.zeros([BLOCK], dtype=tl.float32)
                for k in tl.static_range(R):
                    lora += tl.load(dz_ptr + row * R + k).to(tl.float32) * \
                        tl.load(a_ptr + k * n + start + cols, mask=m, other=0.0).to(tl.float32)
                if DROP:
                    lora = _drop(lora, seed, row, start, n, p, scale, BLOCK)
                dh = dh + lora
            sig = tl.sigmoid(g)
            silu = g * sig
            tl.store(du_ptr + base + start + cols, (dh * silu).to(du_ptr.dtype.element_ty), mask=m)
            tl.store(dg_ptr + base + start + cols, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(dg_ptr.dtype.element_ty),
                     mask=m)
            h = silu * u
            if DROP:  # h as the forward's LoRA branch saw it
                h = _drop(h, seed, row, start, n, p, scale, BLOCK)
            tl.store(h_ptr + base + start + cols, h.to(h_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _quantize_rows_kernel(x_ptr, c_ptr, q_ptr, s_ptr, n, HAS_COL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = row * n
        cols = tl.arange(0, BLOCK)
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            m = start + cols < n
            x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_COL:
                x = x * tl.load(c_ptr + start + cols, mask=m, other=0.0)
            amax = tl.maximum(amax, tl.abs(x))
        s = tl.maximum(tl.max(amax, axis=0) * (1.0 / 448.0), 1.1754943508222875e-38)
        tl.store(s_ptr + row, s)
        inv = tl.math.div_rn(1.0, s)
        for start in range(0, n, BLOCK):
            m = start + cols < n
            x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0).to(tl.float32)
            if HAS_COL:
                x = x * tl.load(c_ptr + start + cols, mask=m, other=0.0)
            tl.store(q_ptr + base + start + cols, tl.clamp(x * inv, -448.0, 448.0).to(tl.float8e4nv), mask=m)


    @triton.jit
    def _transpose_kernel(src, dst, rows, cols, BLOCK: tl.constexpr):
        """One BLOCK x BLOCK tile of src [rows, cols] into dst [cols, rows], turned in registers/shared memory so
        that both the loads and the stores run along contiguous memory."""
        r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = (r[:, None] < rows) & (c[None, :] < cols)
        tile = tl.load(src + r[:, None].to(tl.int64) * cols + c[None, :], mask=m)
        tl.store(dst + c[:, None].to(tl.int64) * rows + r[None, :], tl.trans(tile), mask=tl.trans(m))


def _on(t: torch.Tensor):
    """Launch on `t`'s GPU (Triton launches on the current device; --device_map spreads layers over several)."""
    import contextlib
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """`x` as [rows, n] with each value kept with probability 1 - p (times 1 / (1 - p), in float32) or zeroed (times
    0, as torch's mask does), the mask a function of (seed, row, column, n): the same for every tensor of x's shape,
    in this and the lean MLP's kernels."""
    x2 = _rows(x)
    y = torch.empty_like(x2)
    if x2.numel():
        with _on(x2):
            _dropout_kernel[(x2.shape[0],)](x2, y, x2.shape[1], seed, p, 1.0 / (1.0 - p), BLOCK=_BLOCK)
    return y


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype, fp8: bool, p: float = 0.0,
                   seed: int = 0):
    """(h = silu(gate) * up as [rows, n] in `dtype`, with `fp8` (gate e4m3, gate scales, up e4m3, up scales) as
    `fp8_linear.quantize_rows_torch` makes them, else None, and with p > 0 `dropout(h, p, seed)`, else None)."""
    g2, u2 = _rows(gate), _rows(up)
    rows, n = g2.shape
    h = torch.empty((rows, n), dtype=dtype, device=g2.device)
    hd = torch.empty_like(h) if p > 0 else h
    if fp8:
        kept = (torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=g2.device),
                torch.empty((rows, 1), dtype=torch.float32, device=g2.device),
                torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=g2.device),
                torch.empty((rows, 1), dtype=torch.float32, device=g2.device))
    else:
        kept = (h,) * 4  # unused pointers
    if rows:
        with _on(g2):
            _forward_kernel[(rows,)](g2, u2, h, *kept, hd, n, seed, p, 1.0 / (1.0 - p), FP8=fp8, DROP=p > 0,
                                     BLOCK=_BLOCK)
    return h, (kept if fp8 else None), (hd if p > 0 else None)


# the LoRA path's input gradient is folded into the backward kernel up to this rank (each row reads A, R x n, from L2)
FUSED_LORA_RANK = 16


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_scale: torch.Tensor | None,
                    up_scale: torch.Tensor | None, grad_dtypes: tuple[torch.dtype, torch.dtype], h_dtype: torch.dtype,
                    p: float = 0.0, seed: int = 0, lora: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(d gate, d up, h) as [rows, n]: from the down projection's input gradient `dh` and the kept gate/up
    (float8 with their row scales, or as they were); with p > 0 h is `dropout(h, p, seed)`. With `lora` = (dz
    [rows, r], A [r, n]), r <= FUSED_LORA_RANK, `dh` is the base path's gradient and the LoRA path's,
    `dropout(dz @ A, p, seed)`, is added inside the kernel (in float32, never written out)."""
    dh, g2, u2 = _rows(dh), _rows(gate), _rows(up)
    dz, a = (t.contiguous() for t in lora) if lora is not None else (dh, dh)
    rank = dz.shape[1] if lora is not None else 0
    if lora is not None and (dz.shape[0] != g2.shape[0] or tuple(a.shape) != (rank, g2.shape[1])):
        raise ValueError(f"the LoRA gradient's dz {tuple(dz.shape)} and A {tuple(a.shape)} don't fit rows x n "
                         f"{tuple(g2.shape)}")
    if rank > FUSED_LORA_RANK:
        raise ValueError(f"the fused LoRA input gradient takes ranks up to {FUSED_LORA_RANK}, not {rank}")
    rows, n = g2.shape
    dg = torch.empty((rows, n), dtype=grad_dtypes[0], device=g2.device)
    du = torch.empty((rows, n), dtype=grad_dtypes[1], device=g2.device)
    h = torch.empty((rows, n), dtype=h_dtype, device=g2.device)
    fp8 = gate_scale is not None
    if rows:
        with _on(g2):
            _backward_kernel[(rows,)](dh, g2, u2, gate_scale if fp8 else dh, up_scale if fp8 else dh, dg, du, h, dz, a,
                                      n, seed, p, 1.0 / (1.0 - p), FP8=fp8, DROP=p > 0, R=rank, BLOCK=_BLOCK)
    return dg, du, h


def quantize_rows(t: torch.Tensor, col_scale: torch.Tensor | None = None):
    """`t` [..., n] (times `col_scale` [n], float32, per column, if given) as ([rows, n] float8 e4m3, [rows, 1]
    float32 scales): `fp8_linear.quantize_rows_torch`'s values, in one pass."""
    t2 = _rows(t)
    rows, n = t2.shape
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=t2.device)
    s = torch.empty((rows, 1), dtype=torch.float32, device=t2.device)
    if rows:
        c = col_scale.contiguous() if col_scale is not None else s
        with _on(t2):
            _quantize_rows_kernel[(rows,)](t2, c, q, s, n, HAS_COL=col_scale is not None, BLOCK=_BLOCK)
    return q, s


_TRANSPOSE_BLOCK = 64


def transpose(t: torch.Tensor) -> torch.Tensor:
    """`t.t().contiguous()` for a 2-D tensor of 1-byte values (float8): torch's strided copy moved a Qwen2-VL-7B
    float8 MLP weight at about 145 GB/s on an H100 (0.47 ms; --fp8_base's backward turns every base weight once a
    step), a tiled copy reads and writes along rows."""
    if t.dim() != 2 or t.element_size() != 1:
        raise ValueError(f"transpose takes a 2-D tensor of 1-byte values, not {tuple(t.shape)} {t.dtype}")
    if max(t.shape) > _TRANSPOSE_BLOCK * 65535:  # CUDA's grid: 65,535 blocks along its second dimension
        return t.t().contiguous()
    src = t.contiguous().view(torch.uint8)
    rows, cols = src.shape
    out = torch.empty((cols, rows), dtype=torch.uint8, device=src.device)
    if src.numel():
        grid = (triton.cdiv(rows, _TRANSPOSE_BLOCK), triton.cdiv(cols, _TRANSPOSE_BLOCK))
        with _on(src):
            _transpose_kernel[grid](src, out, rows, cols, BLOCK=_TRANSPOSE_BLOCK)
    return out.view(t.dtype)
