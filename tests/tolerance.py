"""Tolerances for float32 comparisons, derived from the arithmetic instead of picked.

Two float32 evaluations of the same network that differ only in the order of operations (a fused
addmm instead of matmul + add, another kernel, another summation order) round differently. A dot
product of `width` terms carries a rounding error of about sqrt(width) ulps of its result (errors of
random sign add like a random walk; Higham, Accuracy and Stability, ch. 3), and every sequential
matmul stage adds its own on top of what its input already carries (normalised layers pass errors
on roughly unscaled), so the bound grows linearly with `depth`. An ulp is eps = 1.19e-7 times the
magnitude, so the bound is relative to the largest output. A real defect (an adapter lost or
mis-scaled, a token attending where it must not) moves outputs by a sizeable share of that magnitude,
hundreds of times the bound."""
from __future__ import annotations

import math

import torch

EPS32 = torch.finfo(torch.float32).eps


def float32_atol(reference: torch.Tensor, depth: int, width: int) -> float:
    """Absolute tolerance for outputs of `depth` sequential matmul stages with dot products of
    `width` terms, scaled to the largest magnitude in `reference`."""
    return EPS32 * depth * math.sqrt(width) * float(reference.abs().max())


def matmul_stages(config) -> tuple[int, int]:
    """(depth, width) of a Qwen2-VL-style language model: per decoder layer the q/k/v projections,
    attention (scores, then the weighted sum), o_proj, gate/up and down, plus the LM head."""
    text = getattr(config, "text_config", config)
    return 6 * text.num_hidden_layers + 1, max(text.hidden_size, text.intermediate_size)


# ---------------------------------------------------------------- bf16 (the cuda-marker tests)
#
# On the GPU the kernels accumulate in float32 and store bf16: the error a bf16 result carries is the
# rounding of the tensors stored in bf16 on its way (float32 accumulation adds K * eps32, far below),
# each rounding moving every element by at most the unit roundoff u = eps/2 = 2^-8 of its magnitude.
# Errors are relative and pass through normalised layers roughly unscaled (as above), so a result that
# went through `roundings` bf16 roundings more than the reference it is compared with differs from it by at
# most roundings * u, norm-wise relative. A defect (a token attending across samples, an adapter lost or
# mis-scaled) moves results by a sizeable share of their magnitude.

EPS_BF16 = torch.finfo(torch.bfloat16).eps
U_BF16 = EPS_BF16 / 2


def bf16_rtol(roundings: int) -> float:
    """Norm-wise relative tolerance for a result that differs from its reference by `roundings`
    roundings of intermediate tensors to bf16."""
    return roundings * U_BF16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative difference |a - b| / |b| (in float64)."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
