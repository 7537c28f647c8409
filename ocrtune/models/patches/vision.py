"""The vision tower's input side: the patch embedding as one GEMM (a Conv3d whose stride equals its kernel,
PEFT's LoRA on it included), the dtype the tower reads its pixels in, and the ViT's position ids and attention
boundaries made on the host (`vision_host_kwargs`, what the packed forward hands the vision forward)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from ocrtune.models.patches.common import replace_forward

def _patch_embed_as_linear(self, hidden_states):
    proj = self.proj
    lora = _plain_lora(proj)
    if not isinstance(proj, nn.Conv3d) and not lora:  # wrapped some other way since it was patched: the stock
        return self._ocrtune_stock_forward(hidden_states)  # forward runs the wrapper (reading `.weight` skips it)
    base = proj.get_base_layer() if lora else proj
    w = base.weight  # [embed, channels, t, p, p]
    x = hidden_states.reshape(-1, w[0].numel()).to(w.dtype)
    out = F.linear(x, w.reshape(w.shape[0], -1), base.bias)
    dtype = out.dtype
    if lora:  # PEFT's LoRA on the conv (the from-scratch recipe's vision targets): A is a conv of the same
        # patchwise shape, B a 1x1x1 conv, so both are GEMMs on the flattened patches too (cuDNN's weight
        # gradient of that conv shape cost ~15 ms of a 0.2 s stage-1 step on an H200)
        for name in proj.active_adapters:
            if name not in proj.lora_A:
                continue
            a, b = proj.lora_A[name].weight, proj.lora_B[name].weight
            xa = proj._cast_input_dtype(x, a.dtype)
            lo = F.linear(F.linear(proj.lora_dropout[name](xa), a.reshape(a.shape[0], -1)), b.reshape(b.shape[0], -1))
            out = out + lo * proj.scaling[name]
    return out.to(dtype)  # as PEFT: the base layer's output dtype


_LORA_CONV_ATTRS = ("lora_A", "lora_B", "lora_dropout", "scaling", "active_adapters", "_cast_input_dtype", "get_base_layer")


def _plain_lora(proj: nn.Module) -> bool:
    """PEFT's plain LoRA on a patchwise Conv3d, adapters active and unmerged (no DoRA, no LoRA bias). Any of the
    PEFT names it reads missing (patch point `patch_embed_lora`) leaves the stock forward, not an error."""
    base = getattr(proj, "base_layer", None)
    return (base is not None and _is_patchwise(base) and all(hasattr(proj, a) for a in _LORA_CONV_ATTRS)
            and not getattr(proj, "merged", True) and not getattr(proj, "disable_adapters", True)
            and not getattr(proj, "lora_variant", None) and not any(getattr(proj, "lora_bias", {}).values()))

def _is_patchwise(conv) -> bool:
    return (isinstance(conv, nn.Conv3d) and conv.stride == conv.kernel_size and conv.groups == 1
            and all(p == 0 for p in conv.padding) and all(d == 1 for d in conv.dilation))

def _patch_embeds(model: nn.Module):
    return (mod for mod in model.modules() if type(mod).__name__.endswith("PatchEmbed"))

def linear_patch_embed(model: nn.Module) -> int:
    """Run Qwen-VL patch embeddings (a Conv3d whose stride equals its kernel: one projection per
    patch) as one GEMM on the flattened patches. cuDNN has no good kernel for that conv shape (in
    bf16 its weight gradient is slowest); the GEMM is the same computation. Returns how many
    modules were patched."""
    return sum(replace_forward(mod, _patch_embed_as_linear) for mod in _patch_embeds(model)
               if _is_patchwise(getattr(mod, "proj", None)))


def vision_input_dtype(model: nn.Module) -> torch.dtype | None:
    """The half dtype the vision tower casts its pixel values to before anything else reads them (the patch
    embedding's weight dtype: transformers' PatchEmbed forwards and `_patch_embed_as_linear` cast to it), or None
    where that is float32 or there is no patch embedding. Pixel values made in that dtype give the same result."""
    for mod in _patch_embeds(model):
        w = getattr(getattr(mod, "proj", None), "weight", None)
        if w is not None:
            return w.dtype if w.dtype in (torch.bfloat16, torch.float16) else None
    return None


@functools.lru_cache(maxsize=512)  # bucketed formula images repeat a few sizes; 512 megapixel images: ~40 MB
def _grid_positions(t: int, h: int, w: int, merge: int) -> torch.Tensor:
    """[t*h*w, 2] (row, column) of one image's patches in the ViT's order, merge x merge blocks first: what
    transformers' `get_vision_position_ids` builds for that image (the same ops, on the host). Read-only: cached."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    return torch.stack([rows.reshape(block).transpose(1, 2).flatten(),
                        cols.reshape(block).transpose(1, 2).flatten()], dim=-1).repeat(t, 1)


def set_host_vision_ids(model: nn.Module, on: bool) -> bool:
    """Whether `forward.image_embeds` hands the ViT position ids made on the host (`vision_host_kwargs`) or lets it
    build them per image on the device, as transformers does (benchmarks compare the two). Returns `on`."""
    for module in model.modules():
        if hasattr(module, "spatial_merge_size") and hasattr(module, "blocks"):  # the vision tower
            module._ocrtune_host_ids = on
    return on


def uses_host_vision_ids(visual: nn.Module) -> bool:
    return getattr(visual, "_ocrtune_host_ids", True)


def vision_host_kwargs(grid: list[list[int]], merge: int, device) -> dict:
    """The Qwen2-VL ViT's rotary position ids and per-frame attention boundaries for images of `grid` ([t, h, w]
    each), made on the host and copied to `device` once. The vision forward takes them from its kwargs
    (`get_vision_position_ids` / `get_vision_cu_seqlens` pop them) instead of building them image by image on the
    device: about ten small kernels an image, thousands a step of packed formula images (~430 at 65,536 tokens),
    each launched before the ViT's first matmul can start."""
    positions = torch.cat([_grid_positions(t, h, w, merge) for t, h, w in grid])
    seqlens = torch.tensor([h * w for t, h, w in grid for _ in range(t)], dtype=torch.int32)
    cu_seqlens = F.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    return {"position_ids": positions.to(device), "cu_seqlens": cu_seqlens.to(device)}
