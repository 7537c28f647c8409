"""ReLoRA (`--relora_steps N`, axolotl's flag): every N steps each LoRA adapter is folded into its base
weight and restarts from zero (A redrawn, B = 0, its optimizer moments cleared), and the learning rate
warms up again over `--relora_warmup_steps`. The sum of several rank-r updates can reach a rank a single
adapter can't, while every step still moves a layer only as a rank-r adapter does (Lialin et al. 2023,
"ReLoRA: High-Rank Training Through Low-Rank Updates").

The folded base weights change, so a checkpoint of such a run carries them (`checkpoint.BASE_OVERLAY`)
beside the adapter; resume, inference and merge load them into the base model before the adapter.
"""
from __future__ import annotations

import torch


def lora_layers(model):
    """(name in the unwrapped model, module) of every LoRA layer of a PEFT-wrapped model."""
    from peft.tuners.lora import LoraLayer
    inner = model.get_base_model()  # PEFT's public way to the *ForConditionalGeneration under the wrappers
    return [(name, m) for name, m in inner.named_modules() if isinstance(m, LoraLayer)]


def base_overlay(model) -> dict[str, torch.Tensor]:
    """{name: weight} of the base layers under the LoRA adapters, named as in the unwrapped model."""
    return {f"{name}.weight": m.get_base_layer().weight for name, m in lora_layers(model)}


@torch.no_grad()
def fold_and_restart(model, optimizer, seed: int) -> int:
    """Add each active adapter's update into its base weight, redraw A (seeded: the same on every rank),
    zero B and drop the adapter's optimizer state. Returns the number of adapters folded."""
    inner_opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper keeps the torch optimizer inside
    layers = lora_layers(model)
    devices = sorted({p.device.index for _, m in layers for p in m.parameters() if p.is_cuda})
    folded = 0
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed_all(seed)
        for _, m in layers:
            base = m.get_base_layer()
            for adapter in m.active_adapters:
                if adapter not in m.lora_A:
                    continue
                base.weight.add_(m.get_delta_weight(adapter).to(base.weight.dtype))
                m.reset_lora_parameters(adapter, True)  # A: kaiming uniform, B: zeros (PEFT's own LoRA init)
                for p in (*m.lora_A[adapter].parameters(), *m.lora_B[adapter].parameters()):
                    inner_opt.state.pop(p, None)  # fresh moments (and Adam's step count) for the fresh adapter
                folded += 1
    return folded


def lr_factor(steps_done: int, every: int, warmup: int) -> float:
    """The learning-rate multiplier of the step after `steps_done` steps: 1 in the first cycle, else a linear
    warm-up over `warmup` steps from each restart (the global schedule's own warm-up covers the first)."""
    if not every or steps_done < every or warmup <= 0:
        return 1.0
    return min(1.0, (steps_done % every + 1) / warmup)
