"""Faster forwards for model parts whose stock kernels are slow, same weights and same math.

Patches are per instance (the module's `forward` attribute), keep the parameters and their names
(checkpoints and merges are unchanged), and record the stock forward as `_ocrtune_stock_forward`.
"""
from __future__ import annotations

import types

import torch.nn as nn
import torch.nn.functional as F


def replace_forward(module: nn.Module, forward) -> bool:
    """Bind `forward(self, ...)` as `module`'s forward, keeping the stock one as `_ocrtune_stock_forward`
    (for fallbacks). A module patched before is left as it is; returns whether it was patched now."""
    if hasattr(module, "_ocrtune_stock_forward"):
        return False
    module._ocrtune_stock_forward = module.forward
    module.forward = types.MethodType(forward, module)
    return True


def _patch_embed_as_linear(self, hidden_states):
    w = self.proj.weight  # [embed, channels, t, p, p]
    x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
    return F.linear(x, w.reshape(w.shape[0], -1), self.proj.bias)


def _is_patchwise(conv) -> bool:
    return (isinstance(conv, nn.Conv3d) and conv.stride == conv.kernel_size and conv.groups == 1
            and all(p == 0 for p in conv.padding) and all(d == 1 for d in conv.dilation))


def linear_patch_embed(model: nn.Module) -> int:
    """Run Qwen-VL patch embeddings (a Conv3d whose stride equals its kernel: one projection per
    patch) as one GEMM on the flattened patches. cuDNN has no good kernel for that conv shape (in
    bf16 its weight gradient is slowest); the GEMM is the same computation. Returns how many
    modules were patched."""
    return sum(replace_forward(mod, _patch_embed_as_linear) for mod in model.modules()
               if type(mod).__name__.endswith("PatchEmbed") and _is_patchwise(getattr(mod, "proj", None)))
