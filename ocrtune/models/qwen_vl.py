"""Every dependence of ocrtune on private transformers / PEFT code, in one place.

ocrtune's speed comes from reaching into transformers' Qwen2-VL modules and PEFT's LoRA layers. All of
that lives here, applied once by `prepare(model, PatchOptions(...))`:
- at model load (`models/loading.py`: the patch-embed GEMM),
- in `train/trainer.py:SftRun` with `--use_liger`, before the LoRA wrap (Liger's kernels patch the
  unwrapped model; `PatchOptions(liger=True)` also hands back Liger's fused linear CE for the loss), and
- in `train/trainer.py:prepare_model` after the LoRA wrap and gradient checkpointing (fused LoRA, the
  recompute limit, the ViT varlen attention, the varlen-aware "sdpa" attention for packed rows).

`PATCH_POINTS` lists each patch point: what it replaces, the private names it relies on (resolvable
references; tests/test_qwen_vl.py checks they exist) and the versions it was checked against.
`checked_versions()` says why the installed transformers/PEFT is outside those versions (or None); there
`prepare` warns once and applies nothing private, and `hidden_states` takes the stock forward.

The packed forward (`hidden_states`, `image_embeds`) is what `train/loss.py:ResponseLoss` runs: a
hand-rolled `Qwen2VLModel.forward` that feeds packed rows to the language model with varlen attention
kwargs.

Sections: versions and patch points / shared helpers / patch embedding / varlen attention (text, ViT) /
PEFT LoRA (fused forward, input upcast) / recompute limit / Liger / packed forward / prepare.
Speed code that reaches into private transformers/PEFT names belongs in a section here, with its row in
`PATCH_POINTS`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import logging
import sys
import types
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ocrtune.models.fp8_linear import Fp8BaseLinear, float8_matmul_reason, fp8_base_linears
from ocrtune.models.lora_addmm import lora_addmm, swiglu_down_lora
from ocrtune.models.quant import is_bnb_linear

log = logging.getLogger("ocrtune")


# ================================================================ versions and patch points

# Inclusive (major.minor) ranges the patches were checked against: the CPU suite on transformers 5.24.0 +
# peft 0.21.2 + torch 2.14.1, bench/gpu_selftest.py and the benchmarks on transformers 5.17 + peft 0.21.0
# (H100/H200). Outside a gated package's range its patch points are not applied (stock forwards).
TESTED = {"transformers": ("5.17", "5.24"), "peft": ("0.21", "0.21"), "torch": ("2.11", "2.14"),
          "liger-kernel": ("0.8", "0.8")}
GATED = ("transformers", "peft")  # torch's varlen kernel and Liger have their own fallbacks (see their sections)


class PatchPoint(NamedTuple):
    name: str
    replaces: str
    relies_on: tuple[str, ...]
    """References that must resolve: `module:Name.attr` (a module or class attribute),
    `module:Class.method(p1, p2)` (a callable taking those parameters), `module:Class#attr.chain`
    (an attribute of every instance of Class inside the model)."""
    package: str  # the package whose versions gate it (TESTED)
    checked: str  # the versions it was checked against


_Q2 = "transformers.models.qwen2_vl.modeling_qwen2_vl"
_TF = "transformers 5.17 (GPU) and 5.24 (CPU suite)"
_PEFT = "peft 0.21.0 (GPU) and 0.21.2 (CPU suite)"

PATCH_POINTS: tuple[PatchPoint, ...] = (
    PatchPoint("unwrap", "walks DDP / PeftModel / LoraModel wrappers to *ForConditionalGeneration (causal_lm; "
               "always used, no stock alternative)",
               ("peft.peft_model:PeftModel#base_model", "peft.tuners.lora.model:LoraModel#model",
                f"{_Q2}:Qwen2VLForConditionalGeneration#lm_head", f"{_Q2}:Qwen2VLForConditionalGeneration#model"),
               "peft", _PEFT),
    PatchPoint("patch_embed", "*PatchEmbed.forward (a Conv3d with stride == kernel) -> one GEMM",
               (f"{_Q2}:PatchEmbed#proj.weight", f"{_Q2}:PatchEmbed#proj.bias"), "transformers", _TF),
    PatchPoint("patch_embed_lora", "PEFT's LoRA Conv3d on the patch embedding, inside the patch-embed GEMM -> two GEMMs",
               tuple(f"peft.tuners.lora.layer:Conv3d#{a}" for a in (
                   "lora_A", "lora_B", "lora_dropout", "scaling", "active_adapters", "merged", "disable_adapters",
                   "lora_variant", "lora_bias", "base_layer", "_cast_input_dtype")), "peft", _PEFT),
    PatchPoint("vision_varlen", "Qwen2-VL VisionAttention.forward -> one varlen call per ViT block",
               (f"{_Q2}:VisionAttention.forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen)",
                f"{_Q2}:VisionAttention#qkv", f"{_Q2}:VisionAttention#proj", f"{_Q2}:VisionAttention#num_heads",
                f"{_Q2}:VisionAttention#scaling", f"{_Q2}:apply_rotary_pos_emb_vision",
                f"{_Q2}:Qwen2VisionTransformerPretrainedModel#blocks",
                "torch.nn.attention.varlen:varlen_attn"), "transformers", _TF + "; torch 2.11-2.14"),
    PatchPoint("sdpa_varlen", "AttentionInterface['sdpa'] -> varlen attention when cu_seq_lens_q is given",
               ("transformers.integrations.sdpa_attention:sdpa_attention_forward",
                "transformers.modeling_utils:AttentionInterface.register",
                "transformers.modeling_utils:ALL_ATTENTION_FUNCTIONS"), "transformers", _TF),
    PatchPoint("packed_forward", "Qwen2VLModel.forward (qwen2_vl only) -> hidden_states(): packed rows, frozen-ViT no_grad, "
               "the ViT's position ids and attention boundaries made on the host (vision_host_kwargs)",
               (f"{_Q2}:Qwen2VLModel.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, attention_mask)",
                f"{_Q2}:Qwen2VLModel.get_image_features(pixel_values, image_grid_thw)",
                f"{_Q2}:get_vision_position_ids(grid_thw, spatial_merge_size, kwargs)",
                f"{_Q2}:get_vision_attention_seqlens(grid_thw, config, kwargs)",
                "transformers.vision_utils:get_vision_cu_seqlens(grid_thw, kwargs)",
                f"{_Q2}:Qwen2VisionTransformerPretrainedModel#spatial_merge_size",
                "transformers.modeling_outputs:BaseModelOutputWithPooling.pooler_output",
                f"{_Q2}:Qwen2VLModel#visual", f"{_Q2}:Qwen2VLModel#language_model",
                f"{_Q2}:Qwen2VLTextModel#config._attn_implementation", f"{_Q2}:Qwen2VLTextModel#config.layer_types"),
               "transformers", _TF),
    PatchPoint("fused_lora", "peft lora Linear.forward -> base output + scaling * h @ B^T in one addmm",
               ("peft.tuners.lora.layer:Linear#lora_variant", "peft.tuners.lora.layer:Linear#_cast_input_dtype",
                "peft.tuners.lora.layer:Linear#active_adapters", "peft.tuners.lora.layer:Linear#scaling",
                "peft.tuners.lora.layer:Linear#lora_A", "peft.tuners.lora.layer:Linear#lora_B",
                "peft.tuners.lora.layer:Linear#lora_dropout", "peft.tuners.lora.layer:Linear#base_layer",
                "peft.tuners.lora.layer:Linear#disable_adapters", "peft.tuners.lora.layer:Linear#merged"),
               "peft", _PEFT),
    PatchPoint("lean_mlp", "SwiGLU MLP.forward whose down_proj is plain LoRA -> swiglu_down_lora (keeps gate/up, "
               "recomputes their product in backward)",
               (f"{_Q2}:Qwen2MLP#gate_proj", f"{_Q2}:Qwen2MLP#up_proj", f"{_Q2}:Qwen2MLP#down_proj",
                f"{_Q2}:Qwen2MLP#config.hidden_act", "peft.tuners.lora.layer:Linear#base_layer"), "peft", _PEFT),
    PatchPoint("lora_input_upcast", "LoraLayer.cast_input_dtype_enabled = False (LoRA runs in the autocast dtype)",
               ("peft.tuners.lora.layer:LoraLayer#cast_input_dtype_enabled",
                "peft.tuners.tuners_utils:BaseTunerLayer._cast_input_dtype(x, dtype)"), "peft", _PEFT),
    PatchPoint("recompute", "GradientCheckpointingLayer.gradient_checkpointing off on all but the first N decoder layers",
               ("transformers.modeling_layers:GradientCheckpointingLayer.gradient_checkpointing",
                f"{_Q2}:Qwen2VLModel#language_model.layers"), "transformers", _TF),
    PatchPoint("liger", "Liger's RMSNorm/SwiGLU/M-RoPE/LayerNorm kernels and fused linear CE "
               "(prepare(liger=True), before the PEFT wrap)",
               ("liger_kernel.transformers:apply_liger_kernel_to_qwen2_vl",
                "liger_kernel.transformers:LigerFusedLinearCrossEntropyLoss"), "liger-kernel", "liger-kernel 0.8.5 (GPU)"),
)


def _installed(package: str) -> str | None:
    """The installed version of `package` (the imported module's `__version__` when it has one)."""
    mod = sys.modules.get(package.replace("-", "_"))
    version = getattr(mod, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(package)
        except Exception:  # noqa: BLE001 - not installed
            return None
    return str(version)


@functools.lru_cache(maxsize=32)
def _outside(package: str, version: str | None) -> str | None:
    """Why `version` of `package` is outside TESTED, or None."""
    from packaging.version import InvalidVersion, Version
    low, high = TESTED[package]
    if version is None:
        return f"{package} is not installed"
    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        return f"{package} {version} is not a version ocrtune can read"
    if Version(low).release[:2] <= release <= Version(high).release[:2]:
        return None
    return f"ocrtune's fast paths were checked against {package} {low}–{high}; found {version}: using the stock forwards"


def checked_versions() -> str | None:
    """Why the installed transformers / PEFT are outside the versions the patch points were checked
    against (one line per package), or None when they are inside."""
    reasons = [r for p in GATED if (r := _outside(p, _installed(p))) is not None and "not installed" not in r]
    return "; ".join(reasons) or None


def _in_range(package: str) -> bool:
    """Whether the patch points gated by `package` may be applied (always for ungated packages)."""
    return package not in GATED or _outside(package, _installed(package)) is None


_WARNED: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason in _WARNED:
        return
    _WARNED.add(reason)
    warnings.warn(reason, stacklevel=3)
    log.warning("%s", reason)


def unresolved(model: nn.Module | None = None) -> list[str]:
    """`PATCH_POINTS` references that do not resolve in the installed packages (`#` references are
    checked on the instances inside `model`, when given). Packages that are not installed are skipped."""
    missing = []
    for point in PATCH_POINTS:
        for ref in point.relies_on:
            why = _resolve(ref, model)
            if why:
                missing.append(f"{point.name}: {ref} ({why})")
    return missing


def _resolve(ref: str, model: nn.Module | None) -> str | None:
    module_name, _, rest = ref.partition(":")
    if importlib.util.find_spec(module_name.split(".")[0]) is None:
        return None  # an optional package (liger-kernel) that is not installed
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        return f"import failed: {e}"
    if "#" in rest:
        cls_name, _, chain = rest.partition("#")
        cls = getattr(obj, cls_name, None)
        if cls is None:
            return f"no {cls_name}"
        instances = [m for m in (model.modules() if model is not None else ()) if isinstance(m, cls)]
        for inst in instances:
            target = inst
            for part in chain.split("."):
                if not hasattr(target, part):
                    return f"{type(inst).__name__} instance has no {chain}"
                target = getattr(target, part)
        return None
    params = None
    if rest.endswith(")"):
        rest, _, plist = rest[:-1].partition("(")
        params = [p.strip() for p in plist.split(",") if p.strip()]
    for part in rest.split("."):
        if not hasattr(obj, part):
            return f"no attribute {part}"
        obj = getattr(obj, part)
    if params:
        names = inspect.signature(obj).parameters
        lost = [p for p in params if p not in names]
        if lost:
            return f"no parameter {', '.join(lost)}"
    return None


# ================================================================ shared helpers

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


# ================================================================ patch embedding: one GEMM instead of a Conv3d

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


# ================================================================ varlen attention: packed text rows (sdpa wrapper) and the ViT

# `ResponseLoss` feeds packed batches to the language model with `cu_seq_lens_*` attention kwargs. For sdpa models
# `install_varlen_sdpa()` wraps transformers' sdpa attention so that, when those kwargs are present, it runs
# `torch.nn.attention.varlen.varlen_attn` (FlashAttention varlen, CUDA) or, where that is unavailable (CPU, old
# torch), sdpa with a block-diagonal causal mask (exact, slower). flash_attention_2/3 read the same kwargs
# natively; eager/flex get the 4-row position ids and transformers builds the document mask from them.

def _varlen_fn():
    """torch's FlashAttention varlen entry point, adapted over its signature changes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    windowed = "window_size" in params
    gqa = "enable_gqa" in params

    def run(q, k, v, cu, max_len, scale, is_causal=True):
        if windowed:
            causal = {"window_size": (-1, 0) if is_causal else (-1, -1)}
        else:
            causal = {"is_causal": is_causal}
        if q.shape[1] != k.shape[1]:
            if gqa:
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, enable_gqa=True, **causal)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)
    return run

_VARLEN = {"fn": None, "checked": False, "warned_fp32": False}

def _block_causal_mask(cu: torch.Tensor, total: int, device) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), (cu[1:] - cu[:-1]).to(device).long())
    if seg.numel() < total:  # trailing tokens outside every sample: their own segment
        seg = torch.cat([seg, seg.new_full((total - seg.numel(),), len(cu))])
    pos = torch.arange(total, device=device)
    return (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])

def packed_attention(module, query, key, value, cu, max_len, scaling=None):
    """Causal attention within each packed sample. query/key/value [1, H, T, D] -> [1, T, H, D]."""
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a batch of one packed row")
    if query.is_cuda and not _VARLEN["checked"]:
        if _get_varlen() is None:
            warnings.warn("torch.nn.attention.varlen is unavailable: packed attention uses sdpa with a "
                          "block-diagonal mask (correct, slower)", stacklevel=2)
    fn = _VARLEN["fn"] if query.is_cuda else None
    dtype = varlen_dtype(query)
    if fn is not None and dtype is not None:
        q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [T, H, D]
        try:
            out = fn(q, k, v, cu.to(q.device, torch.int32), int(max_len), scaling)
            return out.unsqueeze(0)
        except (RuntimeError, TypeError, ValueError) as e:  # kernel not built for this device / dtype
            warnings.warn(f"varlen attention failed ({type(e).__name__}: {str(e)[:120]}); falling back to a "
                          "block-diagonal sdpa mask", stacklevel=2)
            _VARLEN["fn"] = None
    if fn is not None and dtype is None and not _VARLEN["warned_fp32"]:
        _VARLEN["warned_fp32"] = True
        warnings.warn("packed attention on float32 tensors uses sdpa with a dense block mask (correct, slow, "
                      "memory grows with tokens^2): train in bf16 (--dtype auto) or under bf16 autocast", stacklevel=2)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    mask = _block_causal_mask(cu, query.shape[2], query.device)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()

def varlen_dtype(query: torch.Tensor):
    """The half dtype the varlen kernel runs in for `query`, or None. Under autocast that is the
    autocast dtype even for float32 inputs (the rotary step promotes q and k to float32 when the
    embeddings are float32, i.e. float32 master weights); sdpa would be autocast to it the same way,
    and without this a float32 packed row fell back to a dense [T, T] mask."""
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return None

def _get_varlen():
    if not _VARLEN["checked"]:
        _VARLEN["checked"] = True
        _VARLEN["fn"] = _varlen_fn()
    return _VARLEN["fn"]

def _vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """Qwen2-VL VisionAttention with all images in one varlen call (instead of one sdpa call per
    image); the stock forward wherever the varlen kernel or `max_seqlen` is missing."""
    half = hidden_states.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled("cuda")
    fn = _get_varlen() if hidden_states.is_cuda and half else None
    if fn is None or max_seqlen is None:
        return self._ocrtune_stock_forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                           max_seqlen=max_seqlen, **kwargs)
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.to(torch.int32), int(max_seqlen),
             self.scaling, is_causal=False)
    return self.proj(out.reshape(n, -1))

def patch_vision_varlen(visual) -> bool:
    """Route a Qwen2-VL vision tower's attention through one varlen call per block (CUDA only;
    the patched forward defers to the stock one elsewhere). Returns whether anything was patched."""
    attns = [getattr(blk, "attn", None) for blk in getattr(visual, "blocks", [])]
    patched = [replace_forward(attn, _vision_attention_forward) for attn in attns if hasattr(attn, "qkv")]
    return any(patched)

@functools.lru_cache(maxsize=1)
def install_varlen_sdpa() -> bool:
    """Make transformers' "sdpa" attention honour `cu_seq_lens_q` (packed rows); without those
    kwargs it behaves exactly as before. Returns whether it was installed."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False

    def sdpa_or_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
        return packed_attention(module, query, key, value, cu, kwargs.get("max_length_q") or query.shape[2], scaling), None

    AttentionInterface.register("sdpa", sdpa_or_varlen)
    return True


# ================================================================ PEFT LoRA: fused forward (--fused_lora), input upcast

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
    # the dropout mask is drawn again in backward: only x (shared by q/k/v) is kept for A's gradient
    return lora_addmm(result, x, lora_a.weight, lora_b.weight, scaling, p, dtype).to(result.dtype)


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
    good on every LoRA layer (`cast_input_dtype_enabled`, moved from `ResponseLoss._autocast_dtype`).
    Returns how many layers were switched; outside the PEFT versions in TESTED nothing is touched.

    Not `peft.helpers.disable_input_dtype_casting`: that is a context manager that restores the flag on
    exit (and when its generator is collected), so backward and the gradient-checkpoint recompute, which
    run after the forward's context has closed, would upcast again (a recompute whose dtypes differ from
    the forward's), and it walks every module twice per step."""
    if not _in_range("peft"):
        return 0
    n = 0
    for m in model.modules():
        if hasattr(m, "cast_input_dtype_enabled"):
            m.cast_input_dtype_enabled = False
            n += 1
    return n


# ================================================================ recompute limit (--recompute_layers)

def limit_recompute(model: nn.Module, layers: int) -> int:
    """Keep gradient checkpointing on only the first `layers` decoder layers of the language model;
    the others keep their activations (no recompute: faster, more memory). Returns how many recompute."""
    decoder = [m for m in causal_lm(model).model.language_model.layers if getattr(m, "gradient_checkpointing", False)]
    for i, layer in enumerate(decoder):
        layer.gradient_checkpointing = i < layers
    return min(layers, len(decoder))


# ================================================================ Liger (--use_liger)

# Liger's Triton kernels (RMSNorm, SwiGLU, M-RoPE, LayerNorm in the ViT) on a CUDA machine with `liger-kernel`
# installed, and a fused linear cross-entropy for the loss. Where Liger is not installed, no GPU is present, or
# the model is not a Qwen2-VL family model, training runs on the stock modules (same results) and a warning
# says why. `prepare(model, PatchOptions(liger=True))` applies it; SftRun calls that on the unwrapped model before
# the PEFT wrap (Liger swaps the forwards of the model's own norm/MLP modules, which the wrap then sits on).

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
        log.info("Liger kernels applied (RMSNorm, SwiGLU, RoPE)")
    return reason

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


# ================================================================ packed forward: Qwen2VLModel.forward by hand (what ResponseLoss runs)

HOST_VISION_IDS = True  # vision_host_kwargs in image_embeds (bench/learning/profile_stage1.py turns it off to compare)


@functools.lru_cache(maxsize=512)  # bucketed formula images repeat a few sizes; 512 megapixel images: ~40 MB
def _grid_positions(t: int, h: int, w: int, merge: int) -> torch.Tensor:
    """[t*h*w, 2] (row, column) of one image's patches in the ViT's order, merge x merge blocks first: what
    transformers' `get_vision_position_ids` builds for that image (the same ops, on the host). Read-only: cached."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    block = (h // merge, merge, w // merge, merge)
    return torch.stack([rows.reshape(block).transpose(1, 2).flatten(),
                        cols.reshape(block).transpose(1, 2).flatten()], dim=-1).repeat(t, 1)


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


def image_embeds(lm, vlm, input_ids, pixel_values, image_grid_thw):
    """Token embeddings with the image features scattered into the image-pad positions. The ViT runs
    without autograd when it is frozen, with its position ids made on the host (`vision_host_kwargs`), and
    (CUDA) with all images in one varlen call per block."""
    embeds = vlm.get_input_embeddings()(input_ids)
    if pixel_values is None:
        return embeds
    frozen = not any(p.requires_grad for p in vlm.visual.parameters())
    grid = image_grid_thw.tolist()  # the one read of the grids from the device
    kwargs = vision_host_kwargs(grid, vlm.visual.spatial_merge_size, pixel_values.device) if HOST_VISION_IDS else {}
    if pixel_values.is_cuda:  # all images in one varlen attention call per ViT block (trained or frozen)
        if getattr(vlm.visual, "_ocrtune_varlen", None) is None:
            vlm.visual._ocrtune_varlen = patch_vision_varlen(vlm.visual)
        if vlm.visual._ocrtune_varlen:
            kwargs["max_seqlen"] = max(h * w for _, h, w in grid)
    with torch.no_grad() if frozen else contextlib.nullcontext():
        feats = vlm.get_image_features(pixel_values, image_grid_thw, **kwargs).pooler_output
        feats = torch.cat(list(feats), dim=0) if isinstance(feats, (list, tuple)) else feats
    mask = (input_ids == lm.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, feats.to(embeds.dtype))


def hidden_states(lm, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, position_ids=None,
                  mm_token_type_ids=None, cu_seq_lens=None, max_length=None, **kwargs) -> torch.Tensor:
    """The language model's last hidden state for a padded or packed batch (`cu_seq_lens` from
    `data.packing.pack`). `lm` is the *ForConditionalGeneration module (`causal_lm(model)`)."""
    vlm = lm.model
    if getattr(lm.config, "model_type", None) != "qwen2_vl" or not _in_range("transformers"):
        # other families (Qwen2.5-VL window attention, Qwen3-VL deepstack features) go through
        # their own forward; a packed row carries 4-row position ids, from which transformers
        # builds the per-sample (document) attention mask
        out = vlm(input_ids=input_ids, attention_mask=None if cu_seq_lens is not None else attention_mask,
                  pixel_values=pixel_values, image_grid_thw=image_grid_thw, position_ids=position_ids,
                  mm_token_type_ids=mm_token_type_ids, use_cache=False, **kwargs)
        return out.last_hidden_state
    embeds = image_embeds(lm, vlm, input_ids, pixel_values, image_grid_thw)
    text = vlm.language_model
    if cu_seq_lens is not None:  # packed row
        impl = text.config._attn_implementation or "sdpa"
        if impl == "sdpa" or "flash" in impl:
            if impl == "sdpa":
                install_varlen_sdpa()
            m = int(max_length) if max_length is not None else input_ids.shape[1]
            cu = cu_seq_lens.to(input_ids.device, torch.int32)
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
            masks = {t: None for t in set(getattr(text.config, "layer_types", None) or ["full_attention"])}
            out = text(inputs_embeds=embeds, position_ids=position_ids[1:], attention_mask=masks,
                       use_cache=False, **kwargs)
        else:  # eager / flex: transformers builds the document mask from the text positions (row 0)
            out = text(inputs_embeds=embeds, position_ids=position_ids, attention_mask=None, use_cache=False, **kwargs)
    else:
        if position_ids is None:
            if mm_token_type_ids is None:
                mm_token_type_ids = (input_ids == lm.config.image_token_id).long()
            position_ids, _ = vlm.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw,
                                                 attention_mask=attention_mask)
        out = text(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                   use_cache=False, **kwargs)
    return out.last_hidden_state


# ================================================================ regional compilation (--torch_compile)

def compile_blocks(model: nn.Module) -> int:
    """torch.compile each decoder layer of the language model and each block of the vision tower, in place
    (`nn.Module.compile`: names and state dicts unchanged), with dynamic shapes (packed steps differ in length).
    Regional compilation, as accelerate's `compile_regions` does it: the blocks are alike, so inductor compiles one
    of each kind and the rest reuse it; the model's own forward (packing, image placement) stays eager. A small
    model's step is thousands of little elementwise kernels (issue 13: the small preset's ~2,400 a step, matmuls ~35
    of ~290 ms) that inductor fuses. Returns the number of blocks compiled."""
    inner = causal_lm(model).model
    blocks = [*getattr(getattr(inner, "language_model", None), "layers", []),
              *getattr(getattr(inner, "visual", None), "blocks", [])]
    for block in blocks:
        block.compile(dynamic=True)
    return len(blocks)


# ================================================================ prepare: at model load, for Liger (SftRun), in trainer.prepare_model

@dataclass
class PatchOptions:
    """What `prepare` applies. The defaults are what every loaded model gets (`models/loading.py`);
    training (`train/trainer.py:prepare_model`) adds the rest from its flags."""
    patch_embed: bool = True                 # *PatchEmbed Conv3d -> one GEMM (all families)
    fused_lora: bool = False                 # --fused_lora on a LoRA model
    lean_mlp: bool = False                   # --lean_mlp on a LoRA model: SwiGLU MLPs keep gate/up, not h
    lean_mlp_fp8: bool = False               # --lean_mlp_fp8: the lean MLP, keeping gate/up in float8
    fp8_base: bool = False                   # --fp8_base on a LoRA model: the LM's frozen base linears in float8
    packing: bool = False                    # --packing: transformers' "sdpa" honours cu_seq_lens_q
    recompute_layers: int | None = None      # --recompute_layers with gradient checkpointing on
    vision_varlen: bool = False              # qwen2_vl ViT: one varlen call per block on CUDA (training)
    liger: bool = False                      # --use_liger: Liger's kernels (before the PEFT wrap) + fused linear CE


def prepare(model: nn.Module, options: PatchOptions | None = None) -> dict:
    """Apply the patch points `options` asks for to `model` (idempotent) and return what was applied:
    {"patch_embed": modules, "fused_lora": modules, "recompute": layers, "vision_varlen": bool,
    "sdpa_varlen": bool, "skipped": {patch point: why}}; with `liger=True` also "liger" (whether Liger's
    kernels are on the model) and "fused_ce" (Liger's fused linear CE for `ResponseLoss`, or None).
    Outside the tested transformers / PEFT versions (`checked_versions()`) it warns once and applies
    none of that package's patch points; `hidden_states` then takes the stock forward."""
    options = options or PatchOptions()
    applied = {"patch_embed": 0, "fused_lora": 0, "recompute": None, "vision_varlen": False, "sdpa_varlen": False,
               "skipped": {}}
    reason = checked_versions()
    if reason is not None:
        _warn_once(reason)
    skipped = {p.name: _outside(p.package, _installed(p.package)) for p in PATCH_POINTS
               if p.name != "unwrap" and not _in_range(p.package)}
    applied["skipped"] = skipped
    allowed = {p.name: p.name not in skipped for p in PATCH_POINTS}
    if options.patch_embed and allowed["patch_embed"]:
        applied["patch_embed"] = linear_patch_embed(model)
    if options.fused_lora and allowed["fused_lora"]:
        applied["fused_lora"] = fuse_lora_linears(model)
    if options.fp8_base:
        applied["fp8_base"] = fp8_base_linears(model, causal_lm(model).model.language_model)
    if options.lean_mlp or options.lean_mlp_fp8:
        applied["lean_mlp"] = lean_swiglu_mlps(model, options.lean_mlp_fp8) if allowed["lean_mlp"] else 0
    if options.recompute_layers is not None and allowed["recompute"]:
        applied["recompute"] = limit_recompute(model, options.recompute_layers)
    if options.vision_varlen and allowed["vision_varlen"] and allowed["packed_forward"]:
        lm = causal_lm(model)
        visual = getattr(lm.model, "visual", None)
        if getattr(lm.config, "model_type", None) == "qwen2_vl" and visual is not None:
            if getattr(visual, "_ocrtune_varlen", None) is None:
                visual._ocrtune_varlen = patch_vision_varlen(visual)
            applied["vision_varlen"] = bool(visual._ocrtune_varlen)
    if options.packing and allowed["sdpa_varlen"] and allowed["packed_forward"]:
        applied["sdpa_varlen"] = install_varlen_sdpa()
    if options.liger:  # reported only when asked: the report of a plain load stays as it was
        applied.update(_prepare_liger(model, skipped) if allowed["liger"] else {"liger": False, "fused_ce": None})
    return applied


def _prepare_liger(model: nn.Module, skipped: dict) -> dict:
    """prepare's Liger step: the kernels on the unwrapped model and the fused linear CE. Where Liger
    can't run at all, one warning and neither; the reason the kernels were not applied goes to `skipped`."""
    usable = liger_unavailable_reason() is None
    reason = liger_kernels(causal_lm(model))
    if reason is not None:
        _fallback(reason)
        skipped["liger"] = reason
    # the fused CE needs Liger, not its kernels: a model type Liger has no kernels for still gets it
    return {"liger": reason is None, "fused_ce": liger_fused_ce() if usable else None}
