"""Liger (`--use_liger`): Liger's Triton kernels on the unwrapped model and its fused linear cross-entropy.

Liger's kernels (RMSNorm, SwiGLU, M-RoPE, LayerNorm in the ViT) run on a CUDA machine with `liger-kernel`
installed. Where Liger is not installed, no GPU is present, or the model is not a Qwen2-VL family model, training
runs on the stock modules (same results) and a warning says why. `prepare(model, PatchOptions(liger=True))`
applies it; SftRun calls that on the unwrapped model before the PEFT wrap (Liger swaps the forwards of the
model's own norm/MLP modules, which the wrap then sits on). `apply_liger` and `liger_fused_ce` are public for
tests/test_cuda.py and bench/gpu_selftest.py.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import logging
import warnings

import torch

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
        import liger_kernel.transformers  # noqa: F401  (importable with this triton/torch)
    except Exception as e:  # ImportError, or a triton/torch mismatch raising at import
        return f"liger-kernel is not usable ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return None

def liger_kernels(model) -> str | None:
    """Patch `model` in place with Liger's RMSNorm, SwiGLU, RoPE (and ViT LayerNorm) kernels, once.
    Returns why it was not patched, or None (patched now or before); warns about nothing."""
    if getattr(model, "_ocrtune_liger", False):
        return None
    reason = liger_unavailable_reason()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if reason is None and model_type not in _APPLY:
        reason = f"no Liger patch for model type '{model_type}'"
    if reason is None:
        import liger_kernel.transformers as lt
        fn = getattr(lt, _APPLY[model_type], None)
        if fn is None:
            return f"this liger-kernel has no {_APPLY[model_type]}"
        try:
            # the loss is ours (ResponseLoss); Liger's model.forward replacement is not needed
            fn(rope=True, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True, model=model)
        except Exception as e:  # noqa: BLE001 - any patch failure means: run unpatched
            return f"patching failed ({type(e).__name__}: {str(e)[:120]})"
        model._ocrtune_liger = True  # a second call (prepare is idempotent) must not patch again
        try:  # Liger's own kernels are in: a failure here leaves the stock RoPE, nothing half-patched
            folded_mrope_rope(model_type)
        except Exception as e:  # noqa: BLE001
            log.warning("--use_liger: the stock RoPE stays (%s: %s)", type(e).__name__, str(e)[:120])
        log.info("Liger kernels applied (RMSNorm, SwiGLU, RoPE)")
    return reason

# transformers 5 folds Qwen2-VL's and Qwen2.5-VL's M-RoPE sections into the rotary embedding's cos/sin (both halves
# equal, as plain RoPE's) and rotates q and k with the plain `apply_rotary_pos_emb`; liger-kernel 0.8.5 still
# replaces the old `apply_multimodal_rotary_pos_emb`, which nothing calls, so the language model's RoPE ran as ten
# torch ops a layer (about 30 ms of a 7B step at 10k tokens on an H100, forward and backward) and the ViT's as eight
# a block. Liger's plain RoPE kernels take those cos/sin as they are (Qwen3-VL's patch already uses them).
_FOLDED_MROPE = {"qwen2_vl": ("transformers.models.qwen2_vl.modeling_qwen2_vl", "Qwen2VLAttention"),
                 "qwen2_5_vl": ("transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "Qwen2_5_VLAttention")}


def folded_mrope_rope(model_type: str) -> bool:
    """Route a folded-M-RoPE model type's `apply_rotary_pos_emb` (language model) and `apply_rotary_pos_emb_vision`
    (ViT) through Liger's RoPE kernels; a transformers whose attention still calls the sectioned M-RoPE is left to
    Liger's own patch. Returns whether it patched (now or before)."""
    if model_type not in _FOLDED_MROPE:
        return False
    module_name, attention = _FOLDED_MROPE[model_type]
    module = importlib.import_module(module_name)
    if getattr(module.apply_rotary_pos_emb, "_ocrtune_liger", False):
        return True
    src = inspect.getsource(getattr(module, attention).forward)
    if "apply_multimodal_rotary_pos_emb" in src or "apply_rotary_pos_emb(" not in src:
        return False
    from liger_kernel.transformers.rope import liger_rotary_pos_emb, liger_rotary_pos_emb_vision
    module.apply_rotary_pos_emb = _on_cuda(liger_rotary_pos_emb, module.apply_rotary_pos_emb)
    module.apply_rotary_pos_emb_vision = _on_cuda(liger_rotary_pos_emb_vision, module.apply_rotary_pos_emb_vision)
    return True


def _on_cuda(kernel, stock):
    """`kernel` launched on q's own GPU (Triton launches on the current device, and --device_map spreads the layers
    over several; Liger's RoPE, unlike its other kernels, does not set it), `stock` for tensors off CUDA (the patch
    is process-wide: a CPU model in the same process keeps working) and inside torch.compile (Inductor fuses the
    stock ops itself, where tracing Liger's in-place kernel is untested)."""
    @functools.wraps(stock)
    def rope(q, k, cos, sin, *args, **kwargs):
        if not q.is_cuda or torch.compiler.is_compiling():
            return stock(q, k, cos, sin, *args, **kwargs)
        with torch.cuda.device(q.device):
            return kernel(q, k, cos, sin, *args, **kwargs)
    rope._ocrtune_liger = True  # functools.wraps keeps `stock` as __wrapped__: inspect.signature reads its parameters
    return rope


def apply_liger(model) -> bool:
    """Patch `model` in place with Liger's kernels (`liger_kernels`). Returns True if patched (now or
    before); otherwise warns and leaves the model untouched."""
    reason = liger_kernels(model)
    if reason is not None:
        _fallback(reason)
    return reason is None

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


def prepare_liger(model, skipped: dict) -> dict:
    """prepare's Liger step: the kernels on the unwrapped model (`model` is the *ForConditionalGeneration) and
    the fused linear CE. Where Liger can't run at all, one warning and neither; the reason the kernels were not
    applied goes to `skipped`."""
    usable = liger_unavailable_reason() is None
    reason = liger_kernels(model)
    if reason is not None:
        _fallback(reason)
        skipped["liger"] = reason
    # the fused CE needs Liger, not its kernels: a model type Liger has no kernels for still gets it
    return {"liger": reason is None, "fused_ce": liger_fused_ce() if usable else None}
