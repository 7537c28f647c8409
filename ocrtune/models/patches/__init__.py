"""Every change ocrtune makes to a model or to transformers / PEFT, applied in one place: `prepare`.

ocrtune's speed comes from reaching into transformers' Qwen2-VL modules and PEFT's LoRA layers. Each module
here holds the patches of one part, and `prepare(model, PatchOptions(...))` is the only function that applies
them (idempotent; it marks the model, and the forwards refuse a model it never saw):
- at model load (`models/loading.py`: the patch-embed GEMM),
- in `train/trainer.py:SftRun` with `--use_liger`, before the LoRA wrap (Liger's kernels patch the
  unwrapped model; `PatchOptions(liger=True)` also hands back Liger's fused linear CE for the loss),
- in `train/trainer.py:prepare_model` after the LoRA wrap and gradient checkpointing (fused LoRA, lean MLP,
  the recompute limit, the ViT varlen attention, the varlen attention for packed rows, the LoRA input upcast),
- in SftRun for `--fp8_base` (after a shape-only model is materialized) and `--torch_compile` (after the
  DDP/FSDP wrap).

Modules: `versions` (TESTED, PATCH_POINTS, the version gates), `common` (shared helpers, the prepared mark),
`vision` (patch-embed GEMM, host ViT ids), `attention` (varlen text/ViT), `lora` (fused LoRA, lean MLP, float8
base, input upcast), `blocks` (recompute limit, regional compile), `liger`, and `forward` (the packed forward
`hidden_states` that `ResponseLoss` runs; it patches nothing). Code that reaches into private names belongs in
one of them, with its row in `versions.PATCH_POINTS`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ocrtune.models.patches import attention, blocks, liger, lora, vision
from ocrtune.models.patches.common import causal_lm, mark_prepared
from ocrtune.models.patches.versions import PATCH_POINTS, checked_versions, in_range, version_problem, warn_once


@dataclass
class PatchOptions:
    """What `prepare` applies. The defaults are what every loaded model gets (`models/loading.py`);
    training (`train/trainer.py`) adds the rest from its flags."""
    patch_embed: bool = True                 # *PatchEmbed Conv3d -> one GEMM (all families)
    fused_lora: bool = False                 # --fused_lora on a LoRA model
    lean_mlp: bool = False                   # --lean_mlp on a LoRA model: SwiGLU MLPs keep gate/up, not h
    lean_mlp_fp8: bool = False               # --lean_mlp_fp8: the lean MLP, keeping gate/up in float8
    fp8_base: bool = False                   # --fp8_base on a LoRA model: the LM's frozen base linears in float8
    fp8_device: torch.device | None = None   # where fp8_base quantizes the weights (default: where they are)
    packing: bool = False                    # --packing: an sdpa text model runs "ocrtune_varlen" (cu_seq_lens_q)
    recompute_layers: int | None = None      # --recompute_layers with gradient checkpointing on
    vision_varlen: bool = False              # qwen2_vl ViT: one varlen call per block on CUDA (training)
    lora_autocast: bool = False              # training: PEFT's LoRA input upcast off where the forward autocasts
    liger: bool = False                      # --use_liger: Liger's kernels (before the PEFT wrap) + fused linear CE
    compile: bool = False                    # --torch_compile: each decoder layer and ViT block compiled in place
    host_vision_ids: bool | None = None      # False: the ViT's position ids per image on the device (transformers'
                                             # way, to compare); True: made on the host (the default); None: unchanged


def prepare(model: nn.Module, options: PatchOptions | None = None) -> dict:
    """Apply the patch points `options` asks for to `model` (idempotent) and return what was applied:
    {"patch_embed": modules, "fused_lora": modules, "recompute": layers, "vision_varlen": bool,
    "sdpa_varlen": bool, "skipped": {patch point: why}}; with `liger=True` also "liger" (whether Liger's
    kernels are on the model) and "fused_ce" (Liger's fused linear CE for `ResponseLoss`, or None); "fp8_base",
    "lean_mlp", "lora_input_upcast" and "compile" (counts) when asked for.
    Outside the tested transformers / PEFT versions (`checked_versions()`) it warns once and applies
    none of that package's patch points; `hidden_states` then takes the stock forward."""
    options = options or PatchOptions()
    reason = checked_versions()
    if reason is not None:
        warn_once(reason)
    skipped = {p.name: version_problem(p.package) for p in PATCH_POINTS
               if p.name != "unwrap" and not in_range(p.package)}
    applied = {"patch_embed": 0, "fused_lora": 0, "recompute": None, "vision_varlen": False, "sdpa_varlen": False,
               "skipped": skipped}
    allowed = {p.name: p.name not in skipped for p in PATCH_POINTS}
    if options.patch_embed and allowed["patch_embed"]:
        applied["patch_embed"] = vision.linear_patch_embed(model)
    if options.fused_lora and allowed["fused_lora"]:
        applied["fused_lora"] = lora.fuse_lora_linears(model)
    if options.fp8_base:
        applied["fp8_base"] = lora.fp8_base(model, options.fp8_device) if allowed["fp8_base"] else 0
    if options.lean_mlp or options.lean_mlp_fp8:
        applied["lean_mlp"] = lora.lean_swiglu_mlps(model, options.lean_mlp_fp8) if allowed["lean_mlp"] else 0
    if options.lora_autocast:
        applied["lora_input_upcast"] = lora.disable_lora_input_upcast(model) if lora.lora_autocast_dtype(model) else 0
    if options.recompute_layers is not None and allowed["recompute"]:
        applied["recompute"] = blocks.limit_recompute(model, options.recompute_layers)
    if options.vision_varlen and allowed["vision_varlen"] and allowed["packed_forward"]:
        applied["vision_varlen"] = attention.vision_varlen(model)
    if options.packing and allowed["sdpa_varlen"] and allowed["packed_forward"]:
        applied["sdpa_varlen"] = attention.select_varlen_attention(model)
    if options.liger:  # reported only when asked: the report of a plain load stays as it was
        applied.update(liger.prepare_liger(causal_lm(model), skipped) if allowed["liger"]
                       else {"liger": False, "fused_ce": None})
    if options.compile:
        applied["compile"] = blocks.compile_blocks(model)
    if options.host_vision_ids is not None:
        applied["host_vision_ids"] = vision.set_host_vision_ids(model, options.host_vision_ids)
    mark_prepared(model)
    return applied
