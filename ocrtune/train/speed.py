"""Optional speed kernels, each with a clean fallback.

`--fused_lora` (default on) adds each LoRA update into the base layer's output with one addmm
(`out + scaling * h @ B^T` in the GEMM's epilogue) instead of PEFT's separate matmul, scale and add
kernels, each a full pass over a [tokens, out_features] tensor forward and backward. Same math;
any LoRA layer PEFT runs differently (DoRA, several adapters, merged, biased B) keeps PEFT's forward.

`--use_liger` swaps in Liger's Triton kernels (RMSNorm, SwiGLU, M-RoPE, LayerNorm in the ViT) on a
CUDA machine with `liger-kernel` installed, and a fused linear cross-entropy for the loss. Where
Liger is not installed, no GPU is present, or the model is not a Qwen2-VL family model, training
runs on the stock modules (same results) and a warning says why.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn

log = logging.getLogger("ocrtune")

_APPLY = {"qwen2_vl": "apply_liger_kernel_to_qwen2_vl", "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
          "qwen3_vl": "apply_liger_kernel_to_qwen3_vl"}


def _fallback(reason: str) -> None:
    warnings.warn(f"--use_liger: {reason}; using the standard kernels", stacklevel=3)
    log.warning("--use_liger: %s; using the standard kernels", reason)


def liger_unavailable_reason() -> str | None:
    """Why Liger can't be used here, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA device (Liger's kernels are Triton GPU kernels)"
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as e:  # ImportError, or a triton/torch mismatch raising at import
        return f"liger-kernel is not usable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None


def apply_liger(model) -> bool:
    """Patch `model` in place with Liger's RMSNorm, SwiGLU, RoPE (and ViT LayerNorm) kernels.
    Returns True if patched; otherwise warns and leaves the model untouched."""
    reason = liger_unavailable_reason()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if reason is None and model_type not in _APPLY:
        reason = f"no Liger patch for model type '{model_type}'"
    if reason is None:
        import liger_kernel.transformers as lt
        fn = getattr(lt, _APPLY[model_type], None)
        if fn is None:
            reason = f"this liger-kernel has no {_APPLY[model_type]}"
        else:
            try:
                # the loss is ours (ResponseLoss); Liger's model.forward replacement is not needed
                fn(rope=True, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True, model=model)
            except Exception as e:  # noqa: BLE001 - any patch failure means: run unpatched
                reason = f"patching failed ({type(e).__name__}: {str(e)[:120]})"
    if reason is not None:
        _fallback(reason)
        return False
    log.info("Liger kernels applied (RMSNorm, SwiGLU, RoPE)")
    return True


def liger_fused_ce():
    """A callable (weight, hidden, targets) -> summed cross-entropy using Liger's fused linear
    cross-entropy (no [tokens, vocab] logits kept), or None (ResponseLoss then uses its chunked CE)."""
    reason = liger_unavailable_reason()
    if reason is None:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as e:  # noqa: BLE001
            reason = f"no fused linear cross-entropy ({type(e).__name__})"
    if reason is not None:
        _fallback(reason)
        return None
    ce = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def fused(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if hidden.shape[0] == 0:
            return hidden.sum() * 0.0
        return ce(weight, hidden.contiguous(), targets).float()
    return fused


def _fused_lora_forward(self, x, *args, **kwargs):
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
            or active[0] in self.lora_variant or self.lora_B[active[0]].bias is not None):
        return self._ocrtune_stock_forward(x, *args, **kwargs)
    name = active[0]
    lora_a, lora_b, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
    result = self.base_layer(x)
    h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
    if not torch.is_autocast_enabled(x.device.type) and not (result.dtype == h.dtype == lora_b.weight.dtype):
        return (result + lora_b(h) * scaling).to(result.dtype)  # mixed dtypes without autocast: PEFT's math
    out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]), lora_b.weight.t(), alpha=scaling)
    return out.view(result.shape).to(result.dtype)


def fuse_lora_linears(model: nn.Module) -> int:
    """Patch every PEFT LoRA `Linear` in `model` to `_fused_lora_forward`; returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from ocrtune.models.kernels import replace_forward
    return sum(replace_forward(mod, _fused_lora_forward) for mod in model.modules()
               if isinstance(mod, LoraLinear) and isinstance(mod.base_layer, nn.Linear))


def limit_recompute(model: nn.Module, layers: int) -> int:
    """Keep gradient checkpointing on only the first `layers` decoder layers of the language model;
    the others keep their activations (no recompute: faster, more memory). Returns how many recompute."""
    from ocrtune.train.loss import causal_lm
    decoder = [m for m in causal_lm(model).model.language_model.layers if getattr(m, "gradient_checkpointing", False)]
    for i, layer in enumerate(decoder):
        layer.gradient_checkpointing = i < layers
    return min(layers, len(decoder))
