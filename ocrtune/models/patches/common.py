"""What every patch module shares: binding a forward (keeping the stock one), finding the
*ForConditionalGeneration under its wrappers, and the mark `prepare` leaves on a model it prepared."""
from __future__ import annotations

import types

import torch.nn as nn

PREPARED = "_ocrtune_prepared"  # set by `prepare` on the *ForConditionalGeneration


def replace_forward(module: nn.Module, forward) -> bool:
    """Bind `forward(self, ...)` as `module`'s forward, keeping the stock one as `_ocrtune_stock_forward`
    (for fallbacks). A module patched before is left as it is; returns whether it was patched now."""
    if hasattr(module, "_ocrtune_stock_forward"):
        return False
    module._ocrtune_stock_forward = module.forward
    module.forward = types.MethodType(forward, module)
    return True


def causal_lm(model: nn.Module) -> nn.Module:
    """The *ForConditionalGeneration module under PEFT / DDP wrappers."""
    for _ in range(8):  # DDP -> PeftModel -> LoraModel -> *ForConditionalGeneration
        mods = model._modules  # real submodules only: wrappers forward attribute lookups
        if "lm_head" in mods and "model" in mods:
            return model
        inner = mods.get("module") or mods.get("base_model") or mods.get("model")
        if inner is None:
            break
        model = inner
    raise TypeError(f"no language model head found in {type(model).__name__}")


def mark_prepared(model: nn.Module) -> None:
    """Mark the *ForConditionalGeneration under `model` (or `model`, having none) as prepared."""
    try:
        lm = causal_lm(model)
    except TypeError:
        lm = model
    setattr(lm, PREPARED, True)


def assert_prepared(lm: nn.Module) -> None:
    """Raise unless `prepare` ran on the model of `lm` (the *ForConditionalGeneration): the forwards patch
    nothing themselves, so an unprepared model would silently run without the patches it was meant to have."""
    if not getattr(lm, PREPARED, False):
        raise RuntimeError(f"{type(lm).__name__} was not prepared: load it with ocrtune.models.loading.load_model, "
                           "or call ocrtune.models.patches.prepare(model, PatchOptions(...)) before its forward")
