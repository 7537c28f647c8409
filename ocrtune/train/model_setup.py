"""The set-up of an sft run's parts that don't depend on the run's loop: the model (base load, LoRA, patches,
--fp8_base), its optimizer and the defaults a run resolves when it starts (`ResolvedRun`)."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import torch

from ocrtune.compat import enable_activation_checkpointing, quiet_peft_deprecations
from ocrtune.errors import UserError
from ocrtune.models import patches
from ocrtune.models.dtypes import train_dtype
from ocrtune.models.fp8_linear import float8_matmul_reason
from ocrtune.models.loading import build_on_meta, hidden_size, is_random_init, load_model, lora_target_regex
from ocrtune.models.patches import PatchOptions
from ocrtune.models.patches.common import causal_lm
from ocrtune.train.args import SftArgs


def prepare_model(model, args: SftArgs):
    """Freeze what is not trained, add LoRA adapters, and apply the model patches (`patches.prepare`)."""
    if args.train_type == "lora":
        from peft import LoraConfig, get_peft_model

        from ocrtune.models.loading import check_lora_targets
        model.requires_grad_(False)
        targets = lora_target_regex(model, args.target_modules or ["all-linear"])
        check_lora_targets(model, targets, args.lora_rank)  # before PEFT allocates the adapters
        # modules_to_save: whole trained copies (ms-swift's flag); the tie of embed_tokens and lm_head is kept,
        # so on a tied model training one trains both, and merging writes one tied matrix
        saved = check_modules_to_save(model, args.modules_to_save)
        tied = bool(saved) and getattr(model.get_output_embeddings(), "weight", None) is model.get_input_embeddings().weight
        config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                            target_modules=targets, task_type="CAUSAL_LM", modules_to_save=saved,
                            ensure_weight_tying=tied)  # (peft warns when asked to on an untied model)
        with quiet_peft_deprecations():
            model = get_peft_model(model, config)
    elif args.freeze_vit:
        visual = getattr(getattr(model, "model", model), "visual", None)
        if visual is not None:
            visual.requires_grad_(False)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model, use_reentrant=False)
        model.config.use_cache = False
    # the patches of transformers/PEFT internals: fused LoRA, lean MLP, recompute limit, ViT varlen, the varlen
    # attention for packed rows, LoRA input upcast off (the patch-embed GEMM was applied at load: `load_model`)
    patches.prepare(model, PatchOptions(patch_embed=False, fused_lora=args.train_type == "lora" and args.fused_lora,
                                        lean_mlp=args.train_type == "lora" and args.lean_mlp,
                                        lean_mlp_fp8=args.train_type == "lora" and args.lean_mlp_fp8,
                                        packing=args.packing,
                                        recompute_layers=args.recompute_layers if args.gradient_checkpointing else None,
                                        vision_varlen=True, lora_autocast=True))
    return model


def check_modules_to_save(model, names: list[str] | None) -> list[str] | None:
    """--modules_to_save as given, each name matching a module of the model (its last name parts)."""
    if not names:
        return None
    have = {n for n, _ in model.named_modules()}
    for name in names:
        if not any(h == name or h.endswith("." + name) for h in have):
            raise UserError(f"--modules_to_save {name}: the model has no module of that name",
                            "name a module, e.g. embed_tokens or lm_head")
    return list(names)


def vision_lrs(model, args: SftArgs) -> dict[int, float]:
    """{id(parameter): lr} for the vision tower's parameters (--vit_lr) and its merger's, the aligner
    (--aligner_lr), where those flags are given; everything else trains at --learning_rate."""
    visual = getattr(getattr(causal_lm(model), "model", None), "visual", None)
    if visual is None or (args.vit_lr is None and args.aligner_lr is None):
        return {}
    lrs = {}
    for name, module in visual.named_children():
        lr = args.aligner_lr if "merger" in name else args.vit_lr
        if lr is not None:
            lrs.update({id(p): lr for p in module.parameters()})
    return lrs


def make_optimizer(model, args: SftArgs, total_steps: int):
    from transformers import get_scheduler
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: every parameter is frozen", "use --train_type lora, or --freeze_vit false with full")
    def decay_groups(ps, **lr):  # matrices decay, biases and norms don't
        return [{"params": [p for p in ps if p.ndim >= 2], "weight_decay": args.weight_decay, **lr},
                {"params": [p for p in ps if p.ndim < 2], "weight_decay": 0.0, **lr}]
    lrs = vision_lrs(model, args)
    groups = decay_groups([p for p in params if id(p) not in lrs])
    for lr in dict.fromkeys(lrs[id(p)] for p in params if id(p) in lrs):  # the vision groups after the usual two
        groups += decay_groups([p for p in params if lrs.get(id(p)) == lr], lr=lr)
    fused = all(p.is_cuda for p in params)
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2), fused=fused or None)
    warmup = args.warmup_steps or math.ceil(args.warmup_ratio * total_steps)
    name = "constant_with_warmup" if args.lr_scheduler_type == "constant" else args.lr_scheduler_type
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def default_lr(args: SftArgs, preset: bool) -> float:
    if args.train_type in ("lora", "qlora"):
        return 1e-3 if preset else 1e-4
    return 5e-4 if preset else 1e-5


def model_defaults(args: SftArgs, spec, announce: bool = False) -> SftArgs:
    """`args` with the model's own sft settings (`ModelSpec.sft_defaults`, e.g. the bundled reader's first run) where
    no flag or environment variable (MAX_PIXELS) gave them, said in one line with `announce`. Not for rlhf, whose
    batches and data mean other things."""
    from ocrtune.args import given_flags, replaced
    if spec is None or not spec.sft_defaults or getattr(args, "rlhf_type", None):
        return args
    given, default = given_flags(args), {f.name: f.default for f in dataclasses.fields(args)}
    taken = {k: v for k, v in spec.sft_defaults.items() if k not in given and getattr(args, k) == default[k]}
    if taken and announce:
        shown = " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in taken.items())
        print(f"{spec.name}'s first-run settings, where no flag gave them: {shown}", file=sys.stderr, flush=True)
    return replaced(args, **taken)


def with_default_model(args: SftArgs) -> SftArgs:
    """No --model or --model_type: DEFAULT_MODEL, written into the run's settings (args.json, a resume) by name."""
    from ocrtune.args import replaced
    from ocrtune.models.registry import DEFAULT_MODEL
    return args if args.model or args.model_type else replaced(args, model=DEFAULT_MODEL)


@dataclasses.dataclass(frozen=True)
class ResolvedRun:
    """The settings an sft run derives from its arguments when it starts (the defaults that depend on
    the model or the machine). `SftArgs` stays what was given; `SftRun.args` is a copy with these filled in."""
    dataset: list[str]
    save_steps: int
    use_liger: bool
    learning_rate: float

    @classmethod
    def of(cls, args: SftArgs, spec, model_dir=None) -> "ResolvedRun":
        use_liger = args.use_liger
        if use_liger is None:  # auto: on where it can run and pays, silently off elsewhere
            from ocrtune.models.patches.liger import liger_unavailable_reason
            use_liger = liger_unavailable_reason() is None and (model_dir is None or hidden_size(model_dir) >= LIGER_MIN_HIDDEN)
        return cls(dataset=args.dataset or ["latex-ocr-sample"], save_steps=args.save_steps or args.eval_steps,
                   use_liger=use_liger,
                   learning_rate=default_lr(args, bool(spec and spec.preset)) if args.learning_rate is None
                   else args.learning_rate)


SPEED_MAX_TOKENS = 10_240  # 7B LoRA on one H100 with the float8 paths and no recompute: 150.7 samples/s in 38.8 GiB


def speed_max(args: SftArgs, device) -> tuple[dict, list[str]]:
    """--speed max: the flag values this run takes (a flag the user gave is kept) and, for the speed-ups it
    can't take, why not."""
    from ocrtune.args import given_flags
    if args.speed != "max":
        return {}, []
    given, lora = given_flags(args), args.train_type in ("lora", "qlora")
    fp8_no = ("full fine-tuning trains the base weights" if not lora else
              f"the base is quantized by --quant_bits {args.quant_bits}" if args.quant_bits else
              "the weights are sharded (--fsdp/--deepspeed)" if args.fsdp or args.deepspeed else
              "--relora_steps folds adapters into the base" if args.relora_steps else
              "float8 matmuls need a CUDA GPU" if device.type != "cuda" else None)
    if fp8_no is None:
        fp8_no = float8_matmul_reason(device, train_dtype(args.dtype, device))
    # rlhf (its args name an rlhf_type) scores each completion on its own padded row: packed, every advantage
    # would weigh every completion's tokens
    no_pack = "rlhf pads each completion to its own row" if getattr(args, "rlhf_type", None) else None
    wanted = [("fp8_base", True, fp8_no), ("lean_mlp_fp8", True, fp8_no),
              ("lora_dropout", 0.0, None if lora else "full fine-tuning has no LoRA dropout"),
              ("gradient_checkpointing", False, None), ("packing", True, no_pack),
              ("packing_tokens", SPEED_MAX_TOKENS, no_pack or (None if "packing" not in given or args.packing
                                                               else "--packing false given"))]
    changes, skipped = {}, []
    for name, value, why_not in wanted:
        if name in given:
            skipped.append(f"--{name} {getattr(args, name)} (given)")
        elif why_not:
            skipped.append(f"--{name} ({why_not.split(': drop')[0]})")
        elif getattr(args, name) != value:
            changes[name] = value
    return changes, skipped


def speed_line(changes: dict, skipped: list[str]) -> str:
    on = " ".join(f"--{k} {str(v).lower() if isinstance(v, bool) else v}" for k, v in changes.items()) or "nothing more"
    return f"--speed max: {on}" + (f"; not taken: {', '.join(skipped)}" if skipped else "")


# Liger's Triton kernels lose to the stock ones at small widths: the small preset (hidden 512, ViT 384) stepped 0.276
# against 0.205 s on an H200 (bench/learning/profile_liger_h200.json); at Qwen2-VL-2B's 1536 and 7B's 3584 they win
LIGER_MIN_HIDDEN = 1024


def check_given_model(args: SftArgs, weights: Path, resume: Path | None) -> None:
    """Refuse what a model given to `SftRun(model=...)` cannot honour: layers placed by --device_map,
    a full-weight resume (the checkpoint is the model), a shape-only folder (built by the run itself)."""
    if args.device_map not in (None, "none"):
        raise UserError(f"--device_map {args.device_map} splits the model the run loads, and this run was given its model",
                        "pass --device_map none (the given model goes to the run's device), or let the run load the model")
    if resume is not None and args.train_type == "full":
        raise UserError(f"{resume} holds the full model weights, which a resumed full run loads in place of a given model",
                        "resume it without a model builder, or give the model to a new run")
    if is_random_init(weights):
        raise UserError(f"{weights} is a shape-only (random-init) model folder, whose weights the run builds itself",
                        "drop the model builder, or point --model at a folder that holds weights")



def base_model(builder, args: SftArgs, weights: Path, dtype, *, meta: bool, device, device_map):
    """The model before Liger and the LoRA wrap: `builder`'s (with the patches `load_model` applies),
    else loaded from `weights` (built on meta for a shape-only folder)."""
    if builder is None:
        if meta:
            return build_on_meta(weights, dtype, args.attn_impl)
        # a quantized base is quantized where it will run (bitsandbytes packs the weights on that device)
        device = device if args.quant_bits and not device_map else None
        return load_model(weights, dtype, args.attn_impl, device=device, device_map=device_map,
                          quant_bits=args.quant_bits, quant_vit=args.quant_vit)
    model = builder(args, weights, dtype)
    from ocrtune.models.quant import model_quant_bits
    bits = model_quant_bits(model)
    if bits != args.quant_bits:
        have, want = f"{bits}-bit quantized" if bits else "unquantized", f"--quant_bits {args.quant_bits}" \
            if args.quant_bits else "an unquantized base"
        raise UserError(f"the model given to the run is {have}, and the run asks for {want}",
                        "load it as the run would (models.loading.load_model(..., quant_bits=...)), or match --quant_bits to it")
    if getattr(model, "peft_config", None):  # prepare_model would wrap it a second time
        raise UserError("the model given to the run already has PEFT adapters",
                        "give the base model: the run adds its own LoRA adapters (and resumes them)")
    patches.prepare(model, PatchOptions())  # idempotent: a builder that used load_model is not patched twice
    return model


def fp8_base(model, device, dtype, device_map, main: bool) -> None:
    """--fp8_base: the language model's frozen LoRA base linears as float8 (models/fp8_linear.py), quantized
    on the run's device. The evaluations during training see that float8 base too; the saved adapter is
    plain LoRA, and `ocrtune infer --ckpt_dir` / `export --merge_lora true` put it on the original bf16 weights.
    The flags it can't go with are refused by `train.args.validate`; what depends on the machine is refused here."""
    if device_map:
        raise UserError(f"--fp8_base runs the model on one GPU per process, not split by --device_map {device_map}",
                        "pass --device_map none (NPROC_PER_NODE=<GPUs> for data parallel), or drop --fp8_base")
    reason = float8_matmul_reason(device, dtype)
    if reason is not None:
        raise UserError(reason)
    n = patches.prepare(model, PatchOptions(patch_embed=False, fp8_base=True, fp8_device=device))["fp8_base"]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the bf16 weights just dropped go back to the device, not the cache
    if main:
        print(f"--fp8_base: {n} base linears of the language model in float8 e4m3", flush=True)
