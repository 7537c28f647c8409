"""The decoder layers and ViT blocks as a whole: gradient checkpointing on the first N decoder layers only
(`--recompute_layers`) and regional compilation (`--torch_compile`)."""
from __future__ import annotations

import torch.nn as nn

from ocrtune.models.patches.common import causal_lm


def limit_recompute(model: nn.Module, layers: int) -> int:
    """Keep gradient checkpointing on only the first `layers` decoder layers of the language model;
    the others keep their activations (no recompute: faster, more memory). Returns how many recompute. Callable
    again between steps (the memory plan raises it): the layers are those gradient checkpointing was enabled on,
    whether a previous call turned them off or not."""
    decoder = [m for m in causal_lm(model).model.language_model.layers if "gradient_checkpointing" in vars(m)]
    for i, layer in enumerate(decoder):
        layer.gradient_checkpointing = i < layers
    return min(layers, len(decoder))


def compile_blocks(model: nn.Module) -> int:
    """torch.compile each decoder layer of the language model and each block of the vision tower, in place
    (`nn.Module.compile`: names and state dicts unchanged), with dynamic shapes (packed steps differ in length).
    Regional compilation, as accelerate's `compile_regions` does it: the blocks are alike, so inductor compiles one
    of each kind and the rest reuse it; the model's own forward (packing, image placement) stays eager. A small
    model's step is thousands of little elementwise kernels (the small preset's ~2,400 a step, matmuls ~35 of
    ~290 ms) that inductor fuses. Returns the number of blocks compiled."""
    inner = causal_lm(model).model
    blocks = [*getattr(getattr(inner, "language_model", None), "layers", []),
              *getattr(getattr(inner, "visual", None), "blocks", [])]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)
