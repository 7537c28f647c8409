"""`ocrtune sft`: the training loop (one readable file, nanoGPT-style), run through accelerate so
the same code runs on one CPU, one GPU or many (torchrun / accelerate launch)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import torch

from ocrtune.compat import enable_activation_checkpointing, quiet_peft_deprecations
from ocrtune.data.checks import check_dataset
from ocrtune.data.loading import load_datasets, validation_data
from ocrtune.errors import UserError
from ocrtune.models.dtypes import train_dtype as resolve_dtype  # noqa: F401  (moved; issue 14)
from ocrtune.models.loading import (build_on_meta, hidden_size, is_random_init, load_model, load_processor,
                                    lora_target_regex, resolve_model, template_name)
from ocrtune.models import patches
from ocrtune.models.fp8_linear import float8_matmul_reason
from ocrtune.models.patches import PatchOptions
from ocrtune.models.patches.common import causal_lm
from ocrtune.models.patches.vision import vision_input_dtype
from ocrtune.models.template import IGNORE_INDEX, Template
from ocrtune import checkpoint as ckpt_io
from ocrtune.train import distributed as dist, relora, schedule
from ocrtune.data.fingerprint import write_fingerprints
from ocrtune.train.args import SftArgs, check_output_dir, normalized, validate
from ocrtune.train.resume import load_adapter, resume_args
from ocrtune.train.data import Collator, EncodedDataset, make_loader, model_pixels, plan_batches
from ocrtune.train.logger import RunLogger, fmt_time
from ocrtune.train.loss import ResponseLoss

log = logging.getLogger("ocrtune")


# ---------------------------------------------------------------- set-up

def new_run_dir(args: SftArgs, model_name: str) -> Path:
    base = Path(args.output_dir)
    if not args.add_output_dir_suffix:
        return base
    parent = base / model_name.replace("/", "--")
    n = len([p for p in parent.glob("v*-*") if p.is_dir()]) if parent.exists() else 0
    return parent / f"v{n}-{datetime.now():%Y%m%d-%H%M%S}"


def make_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {run_dir} is not writable ({e.strerror})", "pass a writable --output_dir") from None


def build_data(args: SftArgs, template: Template, accelerator):
    """The default data builder: `args.dataset` (+ validation split) read, checked and encoded."""
    with accelerator.main_process_first():
        train = load_datasets(args.dataset, "train", args.use_hf, args.seed)
        train, val = validation_data(train, args.dataset, args.val_dataset, args.dataset_test_ratio, args.use_hf, args.seed)
        label = ", ".join(args.dataset)
        train = check_dataset(train, args.check_dataset_strategy, label, template=template)
        if val is not None:
            val = check_dataset(val, args.check_dataset_strategy, "validation data", template=template)
    augment = None
    if args.augment:
        from ocrtune.data.augment import augment_printed
        augment = augment_printed
    train_ds = EncodedDataset(train, template, augment, args.seed)
    if args.packing and args.packing_tokens:
        with accelerator.main_process_first():  # rank 0 measures and caches, the others read the cache
            train_ds.lengths()
    return train_ds, (EncodedDataset(val, template) if val is not None else None)


def rows_data(train_rows, val_rows=None, cache: bool = False):
    """A data builder (for `SftRun(args, data=...)`) over rows already in memory, each a dict with
    `images` and `messages`: encoded with the run's template, no checks, no augmentation."""
    def build(args: SftArgs, template: Template, accelerator):
        val = EncodedDataset(val_rows, template, cache=cache) if val_rows is not None else None
        return EncodedDataset(train_rows, template, None, args.seed, cache=cache), val
    return build


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


# Liger's Triton kernels lose to the stock ones at small widths: the small preset (hidden 512, ViT 384) stepped 0.276
# against 0.205 s on an H200 (bench/learning/profile_liger_h200.json); at Qwen2-VL-2B's 1536 and 7B's 3584 they win
LIGER_MIN_HIDDEN = 1024


def memory_gib() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_reserved() / 2**30, 2)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # peak RSS on Linux (KiB)


# ---------------------------------------------------------------- the run

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


class SftRun:
    """One training run. Its parts come from builders (torchtune's builders -> recipe); benchmarks and
    tests pass their own instead of patching this module.

    - `data`: `(args, template, accelerator) -> (train_ds, val_ds or None)`; by default `build_data`
      (the datasets named in `args`); `rows_data(rows)` for rows in memory.
    - `model`: `(args, model_dir, dtype) -> model`, the base model (a *ForConditionalGeneration in `dtype`,
      not PEFT-wrapped; SftRun moves it to the run's device), called where the run would load it; by
      default the weights of `args.model` (`load_model`, or built on meta for a shape-only folder). The
      processor and template still come from `args.model`'s folder. From there on the given model goes
      the way a loaded one does: the load-time patches, Liger, the LoRA wrap, `patches.prepare`, a LoRA
      resume, checkpoints (adapters over the given model; args.json's model_dir names the folder only).
      Refused (UserError, `check_given_model`) with --device_map, a full-weight resume or a shape-only folder."""

    def __init__(self, args: SftArgs, data=None, model=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        validate(args)
        args = normalized(args)  # --train_type qlora -> lora + --quant_bits 4 (what args.json records)
        self.t_start = time.monotonic()  # --max_time counts from here
        self._first_step_at = None  # seconds after t_start when this process's first step ended (--lr_decay_seconds)
        self.resume = ckpt_io.find_resume_checkpoint(args.resume_from_checkpoint, Path(args.output_dir)) \
            if args.resume_from_checkpoint else None
        resume_state = None
        if self.resume is not None:  # everything is read and checked before anything is built or written
            args, note = resume_args(args, self.resume)
            # sharded runs: the full optimizer state is read by rank 0 alone and broadcast into the shards
            # (N full copies would not fit host memory for large full fine-tunes)
            other_rank = bool(args.fsdp or args.deepspeed) and os.environ.get("RANK", "0") != "0"
            resume_state = ckpt_io.read_resume_state(self.resume, args.train_type, optimizer=not other_rank)
            if os.environ.get("RANK", "0") == "0":  # the Accelerator (and its is_main_process) comes later
                print(note, file=sys.stderr)
        check_output_dir(args)
        self.given = args  # not changed below (a resume's settings are the run's saved ones, merged into a new object)
        kwargs = _accelerator_kwargs(args)
        # a given model is never split over GPUs (check_given_model refuses an explicit --device_map)
        self.device_map = dist.device_map_choice("none" if model is not None else args.device_map, torch.cuda.device_count(),
                                                 os.environ.get("LOCAL_RANK") is not None, bool(args.fsdp or args.deepspeed))
        if self.device_map:
            kwargs["device_placement"] = False  # the layers stay where device_map put them
        self.accelerator = acc = Accelerator(**kwargs)
        if args.quant_bits:  # before the data is read: bitsandbytes missing, or no kernels for this device
            from ocrtune.models.quant import check_quant_backend
            check_quant_backend(args.quant_bits, acc.device.type)
        dist.fsdp_on_cpu(acc, kwargs)
        self.main = acc.is_main_process
        dist.quiet_other_ranks(acc)
        self.sharded = dist.is_sharded(acc)
        set_seed(args.seed)

        model_dir, spec = resolve_model(args.model, args.model_type, args.use_hf, args.model_revision)
        self.model_dir, self.spec = model_dir, spec
        if args.predict_with_generate:  # before the data and weights: the model's positions bound the answers
            from ocrtune.models.loading import check_new_tokens
            check_new_tokens(model_dir, args.max_new_tokens)
        self.processor = load_processor(model_dir)
        self.template = Template(self.processor, template_name(model_dir, spec), args.max_length, args.system)
        self.template.set_pixels(args.max_pixels, args.min_pixels)
        self.resolved = ResolvedRun.of(args, spec, model_dir)
        # the run's settings: what was given, with the resolved defaults filled in (these go to args.json, as before)
        self.args = args = dataclasses.replace(args, **dataclasses.asdict(self.resolved))

        t_data = time.monotonic()
        self.train_ds, self.val_ds = (data or build_data)(args, self.template, acc)
        self._startup = {"data_s": time.monotonic() - t_data}  # where a run's first minutes go (printed at step 1)
        dtype = resolve_dtype(args.dtype, acc.device)
        weights = self.resume if (self.resume and args.train_type == "full") else model_dir
        if model is not None:
            check_given_model(args, weights, self.resume)
        self.meta = is_random_init(weights)  # shape-only folder: weights built on meta, initialized sharded
        if self.meta and self.device_map:
            raise UserError(f"{weights} is a shape-only (random-init) model folder, built sharded per rank, and "
                            f"--device_map {self.device_map} would split it in one process",
                            "run it with NPROC_PER_NODE=<GPUs> and --fsdp 'full_shard auto_wrap', or pass --device_map none")
        if self.meta and self.resume is not None:
            raise UserError(f"{weights} is a random-init (shape-only) model folder, which cannot be resumed",
                            "start a new run, or train a model folder that holds weights")
        model = self.base_model(model, weights, dtype)
        if args.quant_bits:  # evaluations between steps must not repack the 4-bit weights for inference (CPU)
            from ocrtune.models.quant import keep_training_layout
            keep_training_layout(model)
        if resume_state is not None and "base_overlay" in resume_state:  # a --relora_steps run: its folded base
            ckpt_io.load_base_overlay(model, self.resume, resume_state.pop("base_overlay"))
        if self.device_map:
            n = len({str(d) for d in model.hf_device_map.values()})
            print(f"ocrtune: one process, the model's layers split over {n} GPUs (--device_map {self.device_map}); "
                  f"NPROC_PER_NODE={torch.cuda.device_count()} runs data parallel instead", flush=True)
        buffers = dist.real_buffers(model) if self.meta else None
        # Liger patches the unwrapped model, so it goes first; its fused CE is the loss's (below)
        liger = patches.prepare(model, PatchOptions(patch_embed=False, liger=True)) if self.resolved.use_liger else {}
        # the adapters' initial weights come from --seed whatever ran since set_seed: a preset built by this process
        # (resolve_model) seeds and draws its own random weights, and a run that built it started from other adapters
        # than the same run with the preset already in the cache
        set_seed(args.seed)
        self.model = prepare_model(model, args)
        dist.wrap_classes_of(acc, self.model)
        std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
        if self.meta and dist.engine_name(acc) != "fsdp2":  # unsharded: materialize here, before the optimizer
            dist.materialize(self.model, acc.device, buffers, std, args.seed)
        if args.fp8_base:  # after materializing: the float8 copies are made from real weights
            self._fp8_base(acc, dtype)
        if resume_state is not None and "adapter" in resume_state:
            load_adapter(self.model, resume_state.pop("adapter"), self.resume, args.lora_rank)

        run_dir = self.resume.parent if self.resume else new_run_dir(args, spec.name if spec else Path(str(model_dir)).name)
        self.run_dir = Path(_from_main(acc, str(run_dir)))  # every rank writes to rank 0's folder
        if self.main:
            make_writable(self.run_dir)
            print(f"run folder: {self.run_dir}", flush=True)

        self._epoch_sizes: dict[int, int] = {}
        self.total_steps = args.max_steps if args.max_steps > 0 else self.epoch_steps_total(args.num_train_epochs)
        self.optimizer, self.scheduler = make_optimizer(self.model, args, self.total_steps)
        self.state = {"global_step": 0, "epoch": 0, "micro_batches_done": 0, "best_metric": None,
                      "best_model_checkpoint": None, "log_acc": [0.0, 0, 0, 0.0, 0]}
        sharded_optimizer_state = None
        if resume_state is not None:
            self.state.update(resume_state.pop("trainer_state"))
            if self.sharded:  # loaded into the shards after prepare, once the parameters are sharded
                sharded_optimizer_state = resume_state.pop("optimizer.pt", {})
            ckpt_io.apply_states(self.resume, resume_state, self.optimizer, self.scheduler)
        if self.main:  # only once the run (and a resume) is set up: a failed resume leaves args.json as it was
            with open(self.run_dir / "args.json", "w") as f:
                json.dump({**dataclasses.asdict(args), "model_dir": str(model_dir), "template": self.template.template,
                           "model_type": spec.name if spec else args.model_type}, f, indent=2)
            write_fingerprints(self.run_dir, (args.dataset or []) + (args.val_dataset or []))  # checked on resume
        self.loss_module = ResponseLoss(self.model, args.loss_chunk_size, liger.get("fused_ce"))
        self.loss_module, self.optimizer = acc.prepare(self.loss_module, self.optimizer)
        if self.meta and dist.engine_name(acc) == "fsdp2":  # each rank allocates and initializes its shards only
            dist.materialize(self.loss_module, acc.device, buffers, std, args.seed)
        if self.resume is not None and self.sharded:
            dist.load_optimizer_state(acc, self.loss_module, self.optimizer, self.resume, sharded_optimizer_state)
        if args.torch_compile:  # in place, after the wrappers (DDP, FSDP2): the blocks keep their names
            blocks = patches.prepare(self.loss_module, PatchOptions(patch_embed=False, compile=True))["compile"]
            if self.main:
                print(f"torch.compile: {blocks} blocks, compiled in the first steps", flush=True)
        self.collator = Collator(self.processor.tokenizer.pad_token_id, args.packing, vision_input_dtype(self.model),
                                 getattr(self.processor.image_processor, "temporal_patch_size", None))
        self.logger = RunLogger(self.run_dir, "none" not in (args.report_to or []),
                                self.state["global_step"] if self.resume else None, enabled=self.main)
        self._startup["setup_s"] = time.monotonic() - self.t_start

    def base_model(self, builder, weights: Path, dtype):
        """The model before Liger and the LoRA wrap: `builder`'s (with the patches `load_model` applies),
        else loaded from `weights` (built on meta for a shape-only folder)."""
        args = self.args
        if builder is None:
            if self.meta:
                return build_on_meta(weights, dtype, args.attn_impl)
            # a quantized base is quantized where it will run (bitsandbytes packs the weights on that device)
            device = self.accelerator.device if args.quant_bits and not self.device_map else None
            return load_model(weights, dtype, args.attn_impl, device=device, device_map=self.device_map,
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

    # -- one optimizer step over a group of micro-batches
    def train_step(self, group: list[dict | None]) -> tuple[float, int, int, float] | None:
        """One optimizer step over `group`. A None micro-batch (every row of it failed to encode)
        is dropped in a single process; with several processes every rank must make the same
        collective calls (DDP's gradient all-reduce in backward, FSDP2/ZeRO-3's all-gathers in
        every forward), so it runs a filler batch with its loss multiplied by 0 instead: no
        gradient, no tokens, no loss or accuracy in the logs. Returns None (no step taken, on
        every rank alike) when no rank has a real row in the group."""
        acc = self.accelerator
        multi = acc.num_processes > 1
        real = [b is not None for b in group]
        group = [b if ok else self._train_filler() for b, ok in zip(group, real)] if multi and not all(real) \
            else [b for b in group if b is not None]
        if not multi:
            real = [True] * len(group)
            if not group:
                return None
        tokens = torch.tensor(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b, ok in zip(group, real) if ok),
                              device=acc.device)
        if multi:  # one all-reduce: the group's tokens and its real micro-batches, over all ranks
            both = acc.reduce(torch.stack([tokens, torch.tensor(sum(real), device=acc.device)]), "sum")
            global_tokens, global_real = int(both[0].item()), int(both[1].item())
            if global_real == 0:
                return None
        else:
            global_tokens = tokens.item()
        loss_sum, correct = 0.0, 0
        self.loss_module.train()
        for i, (batch, ok) in enumerate(zip(group, real)):
            if self.signalled(i):
                raise StopMidGroup
            batch = to_device(batch, acc.device, self.collator.pixel_dtype)
            last = i == len(group) - 1
            # the group's end is the one gradient sync / optimizer step: DeepSpeed's engine steps
            # inside backward whenever accelerate's sync_gradients is set
            acc.sync_gradients = last
            sync = contextlib.nullcontext() if last else acc.no_sync(self.loss_module)
            with sync, acc.autocast():
                l, _, c = self.loss_module(**batch)
                acc.backward(l * acc.num_processes / max(global_tokens, 1) if ok else l * 0)  # a filler: no gradient
            if ok:
                loss_sum, correct = loss_sum + l.detach().float(), correct + c
        acc.sync_gradients = True
        grad_norm = acc.clip_grad_norm_(self.loss_module.parameters(), self.args.max_grad_norm)
        grad_norm = 0.0 if grad_norm is None else grad_norm  # DeepSpeed without clipping reports none
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        # a SIGTERM or --max_time seen by any rank stops every rank after this step (torchrun forwards a signal to
        # each, not always within the same step; clocks differ): the flags ride in the step's last all-reduce, so all
        # ranks read the same answer, and so does the clock that --lr_decay_seconds reads (the ranks' mean)
        sigterm = getattr(self, "_sigterm", None)  # None outside train() (benchmarks call train_step directly)
        self._stop_signal = sigterm is not None and sigterm.requested
        self._stop_now = self._stop_signal or (sigterm is not None and self.time_is_up())
        elapsed = time.monotonic() - self.t_start
        if acc.num_processes > 1:  # log the global batch's loss, not this rank's share
            stats = acc.reduce(torch.stack([torch.as_tensor(x, device=acc.device, dtype=torch.float64) for x in
                                            (loss_sum, correct, float(self._stop_now), float(self._stop_signal),
                                             elapsed)]), "sum")
            loss_sum, correct, tokens = stats[0], stats[1], global_tokens
            self._stop_now, self._stop_signal = bool(stats[2] > 0), bool(stats[3] > 0)
            elapsed = float(stats[4]) / acc.num_processes
        self._scale_lr(self.lr_factor(elapsed))  # the next step's rate
        loss_sum = float(loss_sum)
        self.check_finite(loss_sum, float(grad_norm))
        return loss_sum, int(tokens), int(correct), float(grad_norm)

    def signalled(self, i: int) -> bool:
        """Whether SIGTERM/SIGINT asks to stop before micro-batch `i` (> 0) of a group, so a long gradient
        accumulation can't hold a signal for minutes. Several processes decide together (a collective) every
        STOP_CHECK_EVERY micro-batches: the same on every rank, so none is left waiting in a collective."""
        sigterm = getattr(self, "_sigterm", None)  # None outside train() (benchmarks call train_step directly)
        if sigterm is None or i == 0:
            return False
        acc = self.accelerator
        if acc.num_processes == 1:
            return sigterm.requested
        if i % STOP_CHECK_EVERY:
            return False
        return bool(acc.reduce(torch.tensor(float(sigterm.requested), device=acc.device), "sum").item() > 0)

    def stop_mid_group(self, group_start: tuple) -> int:
        """A signal inside a group: its micro-batches are dropped (no optimizer step), the data position and RNG go
        back to the group's start, and the last completed step is saved (unless it already is; step 0 has nothing
        to save), so a resumed run redoes the group as if it had never stopped. Returns that step."""
        st = self.state
        st["epoch"], st["micro_batches_done"], rng = group_start
        self.optimizer.zero_grad(set_to_none=True)
        if rng is not None:
            ckpt_io.set_rng_state(rng)
        self._stop_now = self._stop_signal = True
        step = st["global_step"]
        if step and not (self.run_dir / f"checkpoint-{step}").exists():
            self.save(None)
        return step

    def _scale_lr(self, factor: float) -> None:
        if factor != 1.0:
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr * factor

    def lr_factor(self, elapsed: float) -> float:
        """The next step's multiplier of the step schedule's rate: warming up again after a ReLoRA restart, and
        `--lr_decay_seconds`' decay by the clock (`elapsed`: seconds since set-up, as --max_time counts them)."""
        a, factor = self.args, 1.0
        if a.relora_steps:
            factor *= relora.lr_factor(self.state["global_step"] + 1, a.relora_steps, self.relora_warmup)
        if a.lr_decay_seconds:
            if self._first_step_at is None:
                self._first_step_at = elapsed
            factor *= schedule.time_decay(elapsed, a.max_time, a.lr_decay_seconds, self._first_step_at)
        return factor

    @property
    def relora_warmup(self) -> int:
        a = self.args
        return a.relora_warmup_steps if a.relora_warmup_steps is not None else max(1, a.relora_steps // 10)

    def time_is_up(self) -> bool:
        return self.args.max_time is not None and time.monotonic() - self.t_start >= self.args.max_time

    def check_finite(self, loss_sum: float, grad_norm: float) -> None:
        """Stop the run when the step's loss or gradient norm is NaN or infinite, naming the last good
        checkpoint (tests/faults.py injects a NaN here)."""
        if not math.isfinite(loss_sum) or not math.isfinite(grad_norm):
            last = ckpt_io.list_checkpoints(self.run_dir)
            raise UserError(f"loss became {'NaN' if loss_sum != loss_sum else 'infinite'} at step {self.state['global_step'] + 1}"
                            + (f"; the last good checkpoint is {last[-1]}" if last else ""),
                            "lower --learning_rate, check the data, or use --dtype float32")

    def _train_filler(self) -> dict:
        """A micro-batch to stand in for a None one: the last good batch this rank saw, else the
        first row of the training data that encodes."""
        if getattr(self, "_filler", None) is None:
            self._filler = self._first_good(self.train_ds)
        if self._filler is None:
            raise UserError("no row of the training data can be encoded (too long or unreadable images)",
                            "raise --max_length, or use --check_dataset_strategy warning to see the bad rows")
        return self._filler

    def _first_good(self, ds) -> dict | None:
        """The first row of `ds` that encodes, collated as a one-row batch (None if no row does)."""
        for i in range(len(ds)):
            sample = ds[i]
            if sample is not None:
                return self.collator([sample])
        return None

    def evaluate(self) -> dict:
        # eager under --torch_compile: no-grad passes (and generation's cache) would compile every block again
        with torch.compiler.set_stance("force_eager") if self.args.torch_compile else contextlib.nullcontext():
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> dict:
        args, acc = self.args, self.accelerator
        self.loss_module.eval()
        loss, tokens, correct = 0.0, 0, 0
        self._eval_filler = None
        bs = args.eval_batch_size or args.batch_size
        # each row once, no wrap-around; every rank the same number of forward passes (collectives under sharding)
        shares = dist.even_batches(len(self.val_ds), acc.process_index, acc.num_processes, bs)
        loader = make_loader(self.val_ds, [b for b, _ in shares], self.collator, args.dataloader_num_workers, False)
        for (_, real), batch in zip(shares, loader):
            if batch is None:  # every row failed to encode: a filler pass keeps the ranks' forwards in step
                if acc.num_processes == 1:
                    continue
                batch, real = self._eval_filler or self._first_good(self.val_ds) or self._train_filler(), False
            else:
                self._eval_filler = batch
            batch = to_device(batch, acc.device, self.collator.pixel_dtype)
            with acc.autocast():
                l, n, c = self.loss_module(**batch)
            if real:
                loss, tokens, correct = loss + float(l), tokens + int(n), correct + int(c)
        totals = torch.tensor([loss, tokens, correct], dtype=torch.float64, device=acc.device)
        if acc.num_processes > 1:
            totals = acc.reduce(totals, "sum")
        loss, tokens, correct = totals.tolist()
        metrics = {"eval_loss": round(loss / max(tokens, 1), 6), "eval_acc": round(correct / max(tokens, 1), 6)}
        if args.predict_with_generate:
            metrics.update(self.generate_metrics())
        return metrics

    def generate_metrics(self) -> dict:
        """Every rank generates its share of the validation rows (the same number of batches on each,
        so sharded forward passes line up); rank 0's metrics cover all rows once."""
        from accelerate.utils import gather_object

        from ocrtune.evaluate.metrics import compute_metrics
        from ocrtune.models.generate import InferEngine
        acc, rows = self.accelerator, self.val_ds.rows
        model = acc.unwrap_model(self.loss_module).model
        engine = InferEngine(dist.SyncedGenerate(model) if self.sharded else model, self.processor, self.template)
        bs = self.args.eval_batch_size or self.args.batch_size
        mine = []
        # LoRA weights stay float32 on a bf16 model with PEFT's input upcast off (prepare_model): run
        # the LoRA branch under the same autocast as training, or its matmuls meet mixed dtypes
        amp = acc.unwrap_model(self.loss_module)._autocast_dtype()
        cast = torch.autocast(acc.device.type, dtype=amp) if amp else contextlib.nullcontext()
        with dist.full_params(self.loss_module), cast:
            if acc.num_processes == 1:  # the inference engine's length-sorted, encoded-ahead batches
                mine = list(enumerate(engine.generate_rows(rows, bs, self.args.max_new_tokens)))
            else:
                for batch, real in dist.even_batches(len(rows), acc.process_index, acc.num_processes, bs):
                    preds = engine.generate([rows[i] for i in batch], self.args.max_new_tokens)
                    mine += list(zip(batch, preds)) if real else []
        pairs = dict(gather_object(mine)) if acc.num_processes > 1 else dict(mine)
        preds = [pairs[i] for i in range(len(rows))]
        refs = [r["messages"][-1]["content"] for r in rows]
        m = compute_metrics(preds, refs)
        return {f"eval_{k}": round(v, 6) for k, v in m.items() if k != "count"}

    def save(self, metrics: dict | None) -> None:
        step = self.state["global_step"]
        if metrics and "eval_loss" in metrics:
            best = self.state["best_metric"]
            if best is None or metrics["eval_loss"] < best:
                self.state["best_metric"] = metrics["eval_loss"]
                self.state["best_model_checkpoint"] = str(self.run_dir / f"checkpoint-{step}")
        acc = self.accelerator
        # under sharding gathering is a collective: every rank takes part, rank 0 writes
        model_sd, optim_sd = dist.gather_state(acc, self.loss_module, self.optimizer, self.args.train_type)
        if self.main:
            model = acc.unwrap_model(self.loss_module).model
            model, optimizer = ((dist.WithState(model, model_sd), dist.WithState(self.optimizer, optim_sd))
                                if self.sharded else (model, self.optimizer))
            overlay = relora.base_overlay(model) if self.args.relora_steps else None
            ckpt_io.save_checkpoint(self.run_dir, step, model, optimizer, self.scheduler, dict(self.state), self.processor,
                                    base_overlay=overlay)
        acc.wait_for_everyone()
        dist.save_engine_state(acc, self.loss_module, self.run_dir / f"checkpoint-{step}")
        acc.wait_for_everyone()
        if self.main:
            best = self.state["best_model_checkpoint"]
            ckpt_io.rotate_checkpoints(self.run_dir, self.args.save_total_limit, Path(best) if best else None)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches of `epoch`: the one plan that both the data stream and the
        position saved in checkpoints follow (with packing its length differs from epoch to epoch)."""
        acc = self.accelerator
        plan = plan_batches(self.train_ds, self.args, epoch, acc.process_index, acc.num_processes)
        if not plan:  # every row measured 0 tokens (unreadable, or over --max_length): nothing to train on
            raise UserError("no training row fits: every row is over --max_length or has an image that can't be read",
                            "raise --max_length, or check the data with --check_dataset_strategy error")
        self._epoch_sizes[epoch] = len(plan)
        return plan

    def micro_per_epoch(self, epoch: int) -> int:
        if epoch not in self._epoch_sizes:
            self.epoch_plan(epoch)
        return self._epoch_sizes[epoch]

    def steps_in_epoch(self, epoch: int) -> int:
        # an epoch's last group may be short: the loop never lets a group span two epochs
        return math.ceil(self.micro_per_epoch(epoch) / self.args.gradient_accumulation_steps)

    def _fp8_base(self, acc, dtype) -> None:
        """--fp8_base: the language model's frozen LoRA base linears as float8 (models/fp8_linear.py), quantized
        on the run's device. The evaluations during training see that float8 base too; the saved adapter is
        plain LoRA, and `ocrtune infer --ckpt_dir` / `export --merge_lora true` put it on the original bf16 weights."""
        if self.args.train_type != "lora":
            raise UserError("--fp8_base keeps the frozen base weights of a LoRA model in float8; full fine-tuning "
                            "trains those weights", "drop --fp8_base, or pass --train_type lora")
        if self.device_map:
            raise UserError(f"--fp8_base runs the model on one GPU per process, not split by --device_map {self.device_map}",
                            "pass --device_map none (NPROC_PER_NODE=<GPUs> for data parallel), or drop --fp8_base")
        if self.sharded:
            raise UserError("--fp8_base runs on one GPU or with DDP, not with sharded weights (--fsdp, --deepspeed)",
                            "drop --fsdp / --deepspeed, or drop --fp8_base")
        reason = float8_matmul_reason(acc.device, dtype)
        if reason is not None:
            raise UserError(reason)
        n = patches.prepare(self.model, PatchOptions(patch_embed=False, fp8_base=True, fp8_device=acc.device))["fp8_base"]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the bf16 weights just dropped go back to the device, not the cache
        if self.main:
            print(f"--fp8_base: {n} base linears of the language model in float8 e4m3", flush=True)

    def epoch_steps_total(self, epochs: float) -> int:
        """Optimizer steps in `epochs` epochs, each counted from its own plan (a fractional last
        epoch counts its share of that epoch's steps)."""
        whole, frac = int(epochs), epochs - int(epochs)
        total = sum(self.steps_in_epoch(e) for e in range(whole))
        if frac > 0:
            total += math.ceil(frac * self.steps_in_epoch(whole))
        return max(1, total)

    def epoch_progress(self) -> float:
        """Epochs done, as the saved position says: whole epochs plus the share of the current one."""
        st = self.state
        return st["epoch"] + st["micro_batches_done"] / max(self.micro_per_epoch(st["epoch"]), 1)

    def micro_batches(self):
        """Yield (epoch, micro-batches done in that epoch including this one, micro-batches in the
        epoch, micro-batch) from the resume point on, in the seeded order."""
        # With loader workers, the next epoch's loader starts (forks its workers, which copy the dataset with its
        # new `epoch`) `2 x workers` micro-batches before this one ends: a fresh loader's first batch takes about one
        # batch per worker to make, a stall the GPU waited out at every epoch (~3 s at 13 workers on an H200,
        # run 14's probe; every ~37 steps for stage 2 on the 1,168 handwrite rows).
        # Not when the run's last step comes first (no pool forked for an epoch that never runs). While the next
        # epoch's loader exists, a filler batch (`_first_good`, made in this process) takes that epoch's augmentation:
        # its loss counts 0 anyway.
        workers, accum = self.args.dataloader_num_workers, self.args.gradient_accumulation_steps
        epoch, skip = self.state["epoch"], self.state["micro_batches_done"]
        batches, loader = self.epoch_loader(epoch, skip)
        while True:
            upcoming = None
            for done, batch in enumerate(loader, start=skip + 1):
                left = len(batches) - done + 1  # micro-batches of this epoch from this one on
                if workers and upcoming is None and left <= 2 * workers + 1 \
                        and self.state["global_step"] + math.ceil(left / accum) < self.total_steps:
                    upcoming = self.epoch_loader(epoch + 1, 0)
                yield epoch, done, len(batches), batch
            epoch, skip = epoch + 1, 0
            batches, loader = upcoming or self.epoch_loader(epoch, 0)

    def epoch_loader(self, epoch: int, skip: int):
        """`epoch`'s plan and a started iterator over its micro-batches from `skip` on."""
        batches = self.epoch_plan(epoch)
        self.train_ds.epoch = epoch
        pin = self.accelerator.device.type == "cuda"
        loader = make_loader(self.train_ds, batches[skip:], self.collator, self.args.dataloader_num_workers, pin)
        return batches, iter(loader)

    def train(self) -> dict:
        from tqdm import tqdm
        st = self.state
        start, start_step = time.time(), st["global_step"]
        bar = tqdm(total=self.total_steps, initial=st["global_step"], desc="train", disable=not self.main,
                   dynamic_ncols=True, unit="step")
        try:
            with stop_on_sigterm() as self._sigterm:
                stopped_at = self._loop(bar, start, start_step)
        finally:
            bar.close()  # the bar's line ends before any error message is printed
            self.logger.close()
        if stopped_at is not None:  # SIGTERM (preemption, a scheduler's limit, `timeout`), Ctrl-C or --max_time
            why = f"by {self._sigterm.name}" if self._stop_signal else f"at --max_time {self.args.max_time:g}s"
            if self.main:
                ckpt = self.run_dir / f"checkpoint-{stopped_at}"
                print(f"stopped {why} at step {stopped_at}; saved {ckpt}; resume with --resume_from_checkpoint last"
                      if stopped_at and ckpt.exists() else
                      f"stopped {why} before the first optimizer step; nothing to save; start the run again",
                      file=sys.stderr, flush=True)
            if self._stop_signal:
                raise SystemExit(128 + self._sigterm.signum)  # the signal's exit status: 143 SIGTERM, 130 SIGINT
        return self.finish()

    def _loop(self, bar, start: float, start_step: int) -> int | None:
        """Train to the last step; returns the step it stopped after instead when SIGTERM or --max_time asked it to."""
        # closed on the way out, an error's too: its loaders' workers ignore SIGTERM (see `make_loader`), so a pool
        # still alive at interpreter exit would keep multiprocessing's exit handler waiting for it forever
        with contextlib.closing(self.micro_batches()) as stream:
            return self._steps(bar, start, start_step, stream)

    def _steps(self, bar, start: float, start_step: int, stream) -> int | None:
        args, st = self.args, self.state
        metrics = None
        first = self.main  # the start-up line still to print (rank 0's)
        while st["global_step"] < self.total_steps:
            group = []
            # where a signal inside this group takes the run back to (RNG only where a group has several micro-batches)
            group_start = (st["epoch"], st["micro_batches_done"],
                           ckpt_io.rng_state() if args.gradient_accumulation_steps > 1 else None)
            t_fetch = time.monotonic()
            for _ in range(args.gradient_accumulation_steps):
                if self.signalled(len(group)):
                    return self.stop_mid_group(group_start)
                epoch, done, size, batch = next(stream)  # the stream's position is the one saved
                st["epoch"], st["micro_batches_done"] = (epoch + 1, 0) if done >= size else (epoch, done)
                group.append(batch)  # None kept: train_step decides (the same on every rank)
                if batch is not None:
                    self._filler = batch
                if done >= size:  # a group never spans two epochs
                    break
            t_step = time.monotonic()
            try:
                out = self.train_step(group)
            except StopMidGroup:
                return self.stop_mid_group(group_start)
            if first:  # one line on where the start-up went (compiling shows in the first step)
                first = False
                su = self._startup
                bar.write(f"start-up: set-up {su['setup_s']:.1f} s (data {su['data_s']:.1f} s), first batch after "
                          f"{t_step - t_fetch:.1f} s, first step {time.monotonic() - t_step:.1f} s"
                          + (" (compiling included)" if args.torch_compile else ""))
            if out is None:  # no rank had a row that encodes: no step
                continue
            loss, tokens, correct, grad_norm = out
            st["global_step"] += 1
            a = st["log_acc"]
            st["log_acc"] = [a[0] + loss, a[1] + tokens, a[2] + correct, a[3] + grad_norm, a[4] + 1]
            step = st["global_step"]
            bar.update(1)
            # --lr_decay_seconds: the clock's schedule has reached 0 at --max_time, so the run is done, not paused
            decayed = bool(args.lr_decay_seconds) and self._stop_now and not self._stop_signal
            last = step == self.total_steps or decayed
            if step % args.logging_steps == 0 or last:
                self.log_train(step, start, start_step)
            metrics = None
            if args.relora_steps and step % args.relora_steps == 0 and not last:
                n = relora.fold_and_restart(self.accelerator.unwrap_model(self.loss_module).model, self.optimizer, args.seed + step)
                if self.main:
                    bar.write(f"relora: {n} LoRA adapters folded into their base weights and restarted at step {step}")
            if self._stop_now and not last:
                self.save(None)  # at once, no evaluation first: a preempted or timed-out run keeps every step it made
                return step
            if self.val_ds is not None and (step % args.eval_steps == 0 or last):
                metrics = self.evaluate()
                self.logger.log({**metrics, "step": step, "global_step/max_steps": f"{step}/{self.total_steps}"})
                bar.write(json.dumps({**metrics, "step": step}))
            if step % self.resolved.save_steps == 0 or last:
                self.save(metrics)
            if decayed:
                if self.main:
                    bar.write(f"the learning rate decayed to 0 at --max_time {args.max_time:g}s (--lr_decay_seconds "
                              f"{args.lr_decay_seconds:g}): the run ends at step {step}")
                return None

    def log_train(self, step: int, start: float, start_step: int) -> None:
        a = self.state["log_acc"]
        done = step - start_step
        elapsed = time.time() - start
        record = {"loss": round(a[0] / max(a[1], 1), 6), "token_acc": round(a[2] / max(a[1], 1), 6),
                  "grad_norm": round(a[3] / max(a[4], 1), 6), "learning_rate": self.optimizer.param_groups[0]["lr"],
                  "memory(GiB)": memory_gib(), "train_speed(iter/s)": round(done / max(elapsed, 1e-9), 6),
                  "epoch": round(self.epoch_progress(), 4),
                  "global_step/max_steps": f"{step}/{self.total_steps}",
                  "percentage": f"{100 * step / self.total_steps:.2f}%", "elapsed_time": fmt_time(elapsed),
                  "remaining_time": fmt_time(elapsed / max(done, 1) * (self.total_steps - step)), "step": step}
        self.state["log_acc"] = [0.0, 0, 0, 0.0, 0]
        self.logger.log(record)

    def finish(self) -> dict:
        ckpts = ckpt_io.list_checkpoints(self.run_dir)
        result = {"last_model_checkpoint": str(ckpts[-1]) if ckpts else None,
                  "best_model_checkpoint": self.state["best_model_checkpoint"], "best_metric": self.state["best_metric"],
                  "global_step": self.state["global_step"], "run_dir": str(self.run_dir)}
        if self.main:
            from ocrtune.plot.plots import plot_run
            plot_run(self.run_dir)
            print(f"last_model_checkpoint: {result['last_model_checkpoint']}")
            best = result["best_model_checkpoint"] or "none (no evaluation ran: no validation data)"
            print(f"best_model_checkpoint: {best}")
            print(f"images: {self.run_dir / 'images'}")
        return result


STOP_CHECK_EVERY = 16  # micro-batches between the ranks' joint checks for a signal inside a group


class StopMidGroup(Exception):
    """Raised by train_step when a signal asks to stop between two micro-batches of a group."""


class stop_on_sigterm:
    """While training: SIGTERM, or SIGINT (Ctrl-C) alike, asks the loop to stop and save instead of killing the
    process: after the current step, or between two micro-batches of a long gradient accumulation (the group is
    dropped, the last completed step saved). A second one aborts at once: SIGINT raises KeyboardInterrupt, a
    second SIGTERM kills the process by its default action. No handler is installed outside the main thread,
    where Python allows none."""
    _UNSET = object()
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested, self.signum, self._previous = False, signal.SIGTERM, {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # the second: no more waiting
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested, self.signum = True, signum
        if os.environ.get("RANK", "0") == "0":
            print(f"{signal.Signals(signum).name}: stopping after the current micro-batch, saving the last completed "
                  "step (send it again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():  # None: a handler not set from Python; the default then
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        return False


def to_device(batch: dict, device, pixel_dtype: torch.dtype | None = None) -> dict:
    """A batch's tensors on `device`, as the model reads them: the loader's light pixels (one frame, 8 bits; a sixth
    of the bytes to copy) restored there (`model_pixels`, in `pixel_dtype`), before the batch reaches the wrapped
    model, whose mixed-precision policy (FSDP2, DeepSpeed fp16) would cast a float `pixel_norm` passed through it."""
    frames, norm = batch.get("pixel_frames"), batch.get("pixel_norm")
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k not in ("pixel_frames", "pixel_norm")}
    if frames is not None:
        norm = None if norm is None else norm.to(device, non_blocking=True)
        out["pixel_values"] = model_pixels(out["pixel_values"], int(frames), norm, pixel_dtype)
    return out


def _accelerator_kwargs(args: SftArgs) -> dict:
    kwargs = {"cpu": not torch.cuda.is_available()}  # lets torchrun on CPU-only hosts use gloo
    if args.deepspeed or args.fsdp:
        from ocrtune.train.distributed import plugin_kwargs
        kwargs.update(plugin_kwargs(args))
    if args.fp8_base:  # its float8 weights are buffers, the same on every rank: DDP need not send them each step
        from accelerate.utils import DistributedDataParallelKwargs
        kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    return kwargs


def _from_main(acc, value):
    if acc.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list
    return broadcast_object_list([value], from_process=0)[0]


def run_sft(args: SftArgs) -> dict:
    try:
        return SftRun(args).train()
    except BaseException as e:
        dist.record_rank_error(e)
        raise
    finally:
        dist.end_process_group()
