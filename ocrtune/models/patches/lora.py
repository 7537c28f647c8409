"""PEFT's LoRA layers: the fused forward (`--fused_lora`), the lean SwiGLU MLP (`--lean_mlp`), the float8 base
(`--fp8_base`, kernels in models/fp8_linear.py) and PEFT's LoRA input upcast switched off under autocast."""
from __future__ import annotations

import sys

import torch
import torch.nn as nn

from ocrtune.models.fp8_linear import Fp8BaseLinear, fp8_base_linears
from ocrtune.models.lora_addmm import lora_addmm, swiglu_down_lora
from ocrtune.models.patches.common import causal_lm, replace_forward
from ocrtune.models.patches.versions import in_range
from ocrtune.models.quant import is_bnb_linear

# `--fused_lora` (default on) adds each LoRA update into the base layer's output with one addmm
# (`out + scaling * h @ B^T` in the GEMM's epilogue) instead of PEFT's separate matmul, scale and add
# kernels, each a full pass over a [tokens, out_features] tensor forward and backward. Its LoRA dropout
# draws the mask again in backward (models/lora_addmm.py) instead of keeping a dropped copy of every
# LoRA input. Same math; any LoRA layer PEFT runs differently (DoRA, several adapters, merged, biased
# A or B) keeps PEFT's forward.

def _plain_adapter(layer) -> str | None:
    """The name of `layer`'s one active adapter when it is plain LoRA (no DoRA or other variant, no
    bias in A or B, not merged or disabled), else None: those keep PEFT's forward."""
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if (layer.disable_adapters or layer.merged or len(active) != 1 or active[0] in layer.lora_variant
            or layer.lora_B[active[0]].bias is not None or getattr(layer.lora_A[active[0]], "bias", None) is not None):
        return None
    return active[0]


def _dropout_and_dtype(layer, name: str, dev: str, dtype: torch.dtype) -> tuple[float, torch.dtype]:
    """(the LoRA dropout rate while training, else 0; the dtype the LoRA math runs in: autocast's, else `dtype`)."""
    drop = layer.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    return p, torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else dtype


def _fused_lora_forward(self, x, *args, **kwargs):
    name = None if (args or kwargs) else _plain_adapter(self)
    if name is None:
        return self._ocrtune_stock_forward(x, *args, **kwargs)
    lora_a, lora_b, scaling = self.lora_A[name], self.lora_B[name], self.scaling[name]
    result = self.base_layer(x)
    dev = x.device.type
    if not torch.is_autocast_enabled(dev) and not (result.dtype == x.dtype == lora_a.weight.dtype == lora_b.weight.dtype):
        h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
        return (result + lora_b(h) * scaling).to(result.dtype)  # mixed dtypes without autocast: PEFT's math
    p, dtype = _dropout_and_dtype(self, name, dev, result.dtype)
    # the dropout mask is drawn again in backward: only x (shared by q/k/v) is kept for A's gradient; the update
    # goes into the output of a base layer known to keep only its input and weight for backward
    inplace = type(self.base_layer) in (nn.Linear, Fp8BaseLinear)
    return lora_addmm(result, x, lora_a.weight, lora_b.weight, scaling, p, dtype, inplace).to(result.dtype)


def _lora_linear_classes() -> tuple[type, ...]:
    """PEFT's LoRA layers over a linear base: `Linear`, and its bitsandbytes ones where bitsandbytes is installed
    (QLoRA: their base output is bitsandbytes' matmul, which dequantizes the weight in its compute dtype; only the
    LoRA update is fused, so the result is the same as PEFT's)."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    classes = [LoraLinear]
    if "bitsandbytes" not in sys.modules:  # no model is quantized (loading one imports it); importing it costs seconds
        return tuple(classes)
    try:
        from peft.tuners.lora import bnb as lora_bnb
        classes += [getattr(lora_bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(lora_bnb, n)]
    except ImportError:
        pass
    return tuple(classes)


def fuse_lora_linears(model: nn.Module) -> int:
    """Patch every PEFT LoRA linear (plain or bitsandbytes-quantized base) in `model` to `_fused_lora_forward`;
    returns how many."""
    classes = _lora_linear_classes()
    return sum(replace_forward(mod, _fused_lora_forward) for mod in model.modules()
               if isinstance(mod, classes) and isinstance(mod.base_layer, nn.Linear))


# --lean_mlp: a SwiGLU MLP whose down_proj is plain LoRA keeps gate and up for backward, not their product
# (models/lora_addmm.py:swiglu_down_lora). Stock MLPs (Qwen2MLP) and Liger's (LigerSwiGLUMLP) alike: both
# compute down_proj(silu(gate_proj(x)) * up_proj(x)).

def _lean_mlp_forward(self, x):
    down = self.down_proj
    name = _plain_adapter(down) if hasattr(down, "lora_A") else None
    base = getattr(down, "base_layer", None)
    # a bitsandbytes linear is an nn.Linear whose `.weight` holds packed integers: never read as the weight
    plain = isinstance(base, nn.Linear) and not is_bnb_linear(base) and not base.weight.requires_grad
    if name is None or not (plain or isinstance(base, Fp8BaseLinear)) or not torch.is_grad_enabled():
        return self._ocrtune_stock_forward(x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    lora_a, lora_b = down.lora_A[name].weight, down.lora_B[name].weight
    dev = x.device.type
    base_dtype = base.weight.dtype if plain else gate.dtype  # float8 weights: the matmul's dtype is the input's
    if not torch.is_autocast_enabled(dev) and not (gate.dtype == base_dtype == lora_a.dtype == lora_b.dtype):
        return down(torch.nn.functional.silu(gate) * up)  # mixed dtypes without autocast: PEFT's math
    p, dtype = _dropout_and_dtype(down, name, dev, gate.dtype)
    return swiglu_down_lora(gate, up, base.weight if plain else base, base.bias if plain else None, lora_a, lora_b,
                            down.scaling[name], p, dtype, fp8=getattr(self, "_ocrtune_lean_fp8", False))


def lean_swiglu_mlps(model: nn.Module, fp8: bool = False) -> int:
    """Patch every SiLU-gated MLP (gate_proj, up_proj, down_proj; hidden_act silu) whose down_proj is a
    PEFT LoRA layer to `_lean_mlp_forward` (keeping gate/up in float8 with `fp8`); returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    def swiglu(m):
        act = getattr(getattr(m, "config", None), "hidden_act", None)
        return (act in ("silu", "swish") and all(hasattr(m, n) for n in ("gate_proj", "up_proj"))
                and isinstance(getattr(m, "down_proj", None), LoraLinear))
    mlps = [m for m in model.modules() if swiglu(m)]
    for m in mlps:
        m._ocrtune_lean_fp8 = fp8
    return sum(replace_forward(m, _lean_mlp_forward) for m in mlps)


def disable_lora_input_upcast(model: nn.Module) -> int:
    """PEFT keeps LoRA weights in float32 on a bf16/fp16 model and upcasts every LoRA input to float32;
    under autocast the LoRA branch runs in the model's dtype instead, so that upcast is switched off for
    good on every LoRA layer (`cast_input_dtype_enabled`; `prepare(lora_autocast=True)` where `lora_autocast_dtype`).
    Returns how many layers were switched; outside the PEFT versions in TESTED nothing is touched.

    Not `peft.helpers.disable_input_dtype_casting`: that is a context manager that restores the flag on
    exit (and when its generator is collected), so backward and the gradient-checkpoint recompute, which
    run after the forward's context has closed, would upcast again (a recompute whose dtypes differ from
    the forward's), and it walks every module twice per step."""
    if not in_range("peft"):
        return 0
    n = 0
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
            n += 1
    return n


def lora_autocast_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype a training forward of `model` runs under autocast in, or None (no autocast). PEFT keeps LoRA
    weights in float32 on a bf16/fp16 model and upcasts every LoRA input to float32 (a copy of each [tokens,
    hidden] activation, float32 matmuls and elementwise ops, another copy back): a third of a 7B LoRA step.
    Instead the LoRA branch runs in the model's dtype under autocast (float32 master weights, as
    mixed-precision training does), with PEFT's input upcast off (`disable_lora_input_upcast`)."""
    base = causal_lm(model).lm_head.weight.dtype
    trained32 = any(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    return base if base in (torch.bfloat16, torch.float16) and trained32 else None


def fp8_base(model: nn.Module, device: torch.device | None = None) -> int:
    """`--fp8_base`: the frozen base linears of the language model's LoRA layers as float8 (`fp8_base_linears`),
    quantized on `device`; returns how many. Base layers made float8 before are not linears any more: idempotent."""
    return fp8_base_linears(model, causal_lm(model).model.language_model, device)
