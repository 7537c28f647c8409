"""The versions the patches were checked against and every private name they rely on.

`PATCH_POINTS` lists each patch point: what it replaces, the private names it relies on (resolvable
references; tests/test_qwen_vl.py checks they exist in the installed packages) and the versions it was
checked against. `checked_versions()` says why the installed transformers/PEFT is outside those versions
(or None); there `prepare` warns once and applies nothing private, and `hidden_states` takes the stock
forward. Speed code that reaches into private transformers/PEFT/accelerate names gets its row here.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import logging
import sys
import warnings
from typing import NamedTuple

import torch.nn as nn

log = logging.getLogger("ocrtune")


# Inclusive (major.minor) ranges the patches were checked against: the CPU suite on transformers 5.24.0 +
# peft 0.21.2 + torch 2.14.1, bench/gpu_selftest.py and the benchmarks on transformers 5.17 + peft 0.21.0
# (H100/H200). Outside a gated package's range its patch points are not applied (stock forwards).
TESTED = {"transformers": ("5.17", "5.24"), "peft": ("0.21", "0.21"), "torch": ("2.11", "2.14"),
          "liger-kernel": ("0.8", "0.8"), "accelerate": ("1.15", "1.16")}
GATED = ("transformers", "peft")  # torch's varlen kernel and Liger have their own fallbacks (see their modules)
# accelerate gates its one point itself (train/distributed.py:fsdp_on_cpu, through `version_problem`)


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
    PatchPoint("sdpa_varlen", "registers the attention 'ocrtune_varlen' (sdpa, or varlen when cu_seq_lens_q is given) "
               "and selects it on the text config of an sdpa model (--packing); 'sdpa' itself is left as it is",
               ("transformers.integrations.sdpa_attention:sdpa_attention_forward",
                "transformers.modeling_utils:AttentionInterface.register",
                "transformers.modeling_utils:ALL_ATTENTION_FUNCTIONS",
                "transformers.masking_utils:AttentionMaskInterface.register", "transformers.masking_utils:sdpa_mask",
                f"{_Q2}:Qwen2VLTextModel#config._attn_implementation"), "transformers", _TF),
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
    PatchPoint("lora_input_upcast", "LoraLayer.cast_input_dtype_enabled = False (LoRA runs in the autocast dtype; "
               "prepare(lora_autocast=True) on a half model with float32 LoRA weights)",
               ("peft.tuners.lora.layer:LoraLayer#cast_input_dtype_enabled",
                "peft.tuners.tuners_utils:BaseTunerLayer._cast_input_dtype(x, dtype)"), "peft", _PEFT),
    PatchPoint("recompute", "GradientCheckpointingLayer.gradient_checkpointing off on all but the first N decoder layers",
               ("transformers.modeling_layers:GradientCheckpointingLayer.gradient_checkpointing",
                f"{_Q2}:Qwen2VLModel#language_model.layers"), "transformers", _TF),
    PatchPoint("liger", "Liger's RMSNorm/SwiGLU/RoPE/LayerNorm kernels and fused linear CE "
               "(prepare(liger=True), before the PEFT wrap); where the attention rotates with the plain "
               "apply_rotary_pos_emb (transformers 5 folds M-RoPE into cos/sin), that name and the ViT's -> Liger's RoPE",
               ("liger_kernel.transformers:apply_liger_kernel_to_qwen2_vl",
                "liger_kernel.transformers:LigerFusedLinearCrossEntropyLoss",
                "liger_kernel.transformers.rope:liger_rotary_pos_emb(q, k, cos, sin)",
                "liger_kernel.transformers.rope:liger_rotary_pos_emb_vision(q, k, cos, sin)",
                f"{_Q2}:apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)",
                f"{_Q2}:apply_rotary_pos_emb_vision(q, k, cos, sin)", f"{_Q2}:Qwen2VLAttention.forward"),
               "liger-kernel", "liger-kernel 0.8.5 (GPU), transformers 5.17 and 5.24"),
    PatchPoint("fp8_base", "the frozen base_layer of each PEFT LoRA Linear in the language model -> Fp8BaseLinear "
               "(--fp8_base; models/fp8_linear.py)",
               ("peft.tuners.lora.layer:Linear#base_layer", f"{_Q2}:Qwen2VLModel#language_model"), "peft", _PEFT),
    PatchPoint("compile", "torch.compile of each decoder layer and ViT block in place (--torch_compile)",
               ("torch.nn:Module.compile", f"{_Q2}:Qwen2VLModel#language_model.layers",
                f"{_Q2}:Qwen2VisionTransformerPretrainedModel#blocks"), "torch", "torch 2.11-2.14"),
    PatchPoint("accelerate_fsdp_cpu", "accelerate's shared distributed_type -> FSDP on multi-process CPU runs "
               "(train/distributed.py:fsdp_on_cpu; accelerate applies an FSDP plugin on accelerators only)",
               ("accelerate.state:PartialState._shared_state", "accelerate.state:AcceleratorState._shared_state",
                "accelerate.utils:DistributedType.FSDP"),
               "accelerate", "accelerate 1.16 (CPU suite)"),
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
def _outside(package: str, version: str | None, effect: str = "using the stock forwards") -> str | None:
    """Why `version` of `package` is outside TESTED (and `effect`, what ocrtune does then), or None."""
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
    return f"ocrtune's fast paths were checked against {package} {low}–{high}; found {version}: {effect}"


def checked_versions() -> str | None:
    """Why the installed transformers / PEFT are outside the versions the patch points were checked
    against (one line per package), or None when they are inside."""
    reasons = [r for p in GATED if (r := _outside(p, _installed(p))) is not None and "not installed" not in r]
    return "; ".join(reasons) or None


def version_problem(package: str, effect: str = "using the stock forwards") -> str | None:
    """Why the installed `package` is outside its TESTED range (and `effect`), or None."""
    return _outside(package, _installed(package), effect)


def in_range(package: str) -> bool:
    """Whether the patch points gated by `package` may be applied (always for ungated packages)."""
    return package not in GATED or _outside(package, _installed(package)) is None


_WARNED: set[str] = set()


def warn_once(reason: str) -> None:
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
