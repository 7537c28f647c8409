"""`ocrtune sft`: the training run, read top to bottom (torchtune's single-device recipe, nanoGPT's loop): `SftRun`
sets up its parts in `setup()` (resume, model, data, optimizer, loss), then `train()` loops over `train_step`,
evaluates, saves and logs; accelerate runs the same code on one CPU, one GPU or many (torchrun / accelerate launch).
The model and optimizer builders are in `model_setup.py`, the evaluations in `evaluation.py`, the learning rate in
`schedule.py`, the stop request in `stopping.py`, the run folder in `run_dir.py`."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch

from ocrtune import checkpoint as ckpt_io
from ocrtune.args import replaced
from ocrtune.data.packing import IGNORE_INDEX
from ocrtune.data.pixels import to_device
from ocrtune.errors import UserError
from ocrtune.models import patches
from ocrtune.models.dtypes import train_dtype
from ocrtune.models.loading import is_random_init, load_processor, resolve_model, template_name
from ocrtune.models.patches import PatchOptions
from ocrtune.models.patches.vision import vision_input_dtype
from ocrtune.models.template import Template
from ocrtune.train import distributed as dist, memory_plan, relora
from ocrtune.train.args import SftArgs, check_output_dir, normalized, validate, validate_fp8_base
from ocrtune.train.data import Collator, build_data, first_good, make_loader, plan_batches
from ocrtune.train.evaluation import evaluate
from ocrtune.train.logger import RunLogger, StepStats, train_record
from ocrtune.train.loss import ResponseLoss
from ocrtune.train.model_setup import (ResolvedRun, base_model, check_given_model, fp8_base, make_optimizer,
                                       model_defaults, prepare_model, speed_line, speed_max, with_default_model)
from ocrtune.train.resume import load_adapter, resume_args
from ocrtune.train.run_dir import make_writable, new_run_dir, write_run_files
from ocrtune.train.schedule import LrSchedule
from ocrtune.train.stopping import STOP_CHECK_EVERY, StopMidGroup, StopRequest, stop_on_sigterm

log = logging.getLogger("ocrtune")


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What `_setup_model` hands on: Liger's fused cross-entropy for the loss, and for a shape-only folder the
    real buffers and init std to materialize its weights with (after the FSDP2 wrap where that shards them)."""
    fused_ce: object = None
    meta_buffers: dict | None = None
    init_std: float = 0.02


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
        self.t_start = time.monotonic()  # --max_time counts from here
        self.given: SftArgs = args  # replaced by the validated, normalized arguments in setup()
        self.args: SftArgs = args  # the run's settings: the given ones with the resolved defaults (args.json)
        self.resume: Path | None = None  # the checkpoint resumed from
        self.state = {"global_step": 0, "epoch": 0, "micro_batches_done": 0, "best_metric": None,
                      "best_model_checkpoint": None}  # the position and best metric checkpoints keep
        self.stats = StepStats()  # the steps since the last log line
        self.stop: StopRequest | None = None  # set while train() runs (benchmarks call train_step alone)
        self._filler = None  # the last good micro-batch, to stand in for an empty one on multi-process runs
        self._epoch_sizes: dict[int, int] = {}
        self._startup: dict[str, float] = {}  # where a run's first minutes go (printed at step 1)
        self.setup(args, data, model)

    # ---------------------------------------------------------------- set-up
    def setup(self, args: SftArgs, data, model) -> None:
        """The run's parts, in the order they depend on each other. Everything a resume reads is checked before
        anything is built or written; args.json is written only once the run (and its resume) is set up."""
        validate(args)
        args = normalized(args)  # --train_type qlora -> lora + --quant_bits 4 (what args.json records)
        args, resume_state = self._setup_resume(args)
        check_output_dir(args)
        self.given = args  # not changed below (a resume's settings are the run's saved ones, merged into a new object)
        self._setup_accelerator(args, given_model=model is not None)
        self.args = args = self._setup_template(args)
        t_data = time.monotonic()
        self.train_ds, self.val_ds = (data or build_data)(args, self.template, self.accelerator)
        self._startup["data_s"] = time.monotonic() - t_data
        self.model, parts = self._setup_model(args, model, resume_state)
        self.args = args = self._setup_memory_plan(args)
        self.run_dir = self._setup_run_dir(args)
        self.total_steps = args.max_steps if args.max_steps > 0 else self.epoch_steps_total(args.num_train_epochs)
        self.optimizer, self.schedule = self._setup_optimizer(args)
        sharded_optimizer_state = self._load_resume_state(resume_state)
        self._write_run_files(args)
        self.loss_module, self.optimizer = self._setup_loss(args, parts, sharded_optimizer_state)
        self.schedule.optimizer = self.optimizer  # the groups the wrapped optimizer steps
        self.collator = Collator(self.processor.tokenizer.pad_token_id, args.packing, vision_input_dtype(self.model),
                                 getattr(self.processor.image_processor, "temporal_patch_size", None))
        self.logger = RunLogger(self.run_dir, "none" not in (args.report_to or []),
                                self.state["global_step"] if self.resume else None, enabled=self.main)
        self._startup["setup_s"] = time.monotonic() - self.t_start

    def _setup_resume(self, args: SftArgs) -> tuple[SftArgs, dict | None]:
        """--resume_from_checkpoint: the saved run's settings merged into `args`, and its state read (not applied)."""
        if not args.resume_from_checkpoint:
            return args, None
        self.resume = ckpt_io.find_resume_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
        args, note = resume_args(args, self.resume)
        # sharded runs: the full optimizer state is read by rank 0 alone and broadcast into the shards
        # (N full copies would not fit host memory for large full fine-tunes)
        other_rank = bool(args.fsdp or args.deepspeed) and os.environ.get("RANK", "0") != "0"
        resume_state = ckpt_io.read_resume_state(self.resume, args.train_type, optimizer=not other_rank)
        if os.environ.get("RANK", "0") == "0":  # the Accelerator (and its is_main_process) comes later
            print(note, file=sys.stderr)
        return args, resume_state

    def _setup_accelerator(self, args: SftArgs, given_model: bool) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        kwargs = dist.accelerator_kwargs(args)
        # a given model is never split over GPUs (check_given_model refuses an explicit --device_map)
        self.device_map = dist.device_map_choice("none" if given_model else args.device_map, torch.cuda.device_count(),
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

    def _setup_template(self, args: SftArgs) -> SftArgs:
        """The model's folder, processor and template; returns the run's settings (the resolved defaults filled in)."""
        args = with_default_model(args)
        self.model_dir, self.spec = model_dir, spec = resolve_model(args.model, args.model_type, args.use_hf,
                                                                    args.model_revision)
        args = model_defaults(args, spec, announce=self.main)
        if args.predict_with_generate:  # before the data and weights: the model's positions bound the answers
            from ocrtune.models.loading import check_new_tokens
            check_new_tokens(model_dir, args.max_new_tokens)
            if "cdm" in args.generate_metrics.lower():  # and the metrics have their tools
                from ocrtune.evaluate.cdm import check_tex
                check_tex(args.tex_root)
        self.processor = load_processor(model_dir)
        self.template = Template(self.processor, template_name(model_dir, spec), args.max_length, args.system)
        self.template.set_pixels(args.max_pixels, args.min_pixels)
        self.processor = self.template.processor  # with the run's pixel bounds: checkpoints save them
        self.resolved = ResolvedRun.of(args, spec, model_dir)
        changes, skipped = speed_max(args, self.accelerator.device)
        if args.speed == "max" and self.main:
            print(speed_line(changes, skipped), file=sys.stderr)
        args = dataclasses.replace(args, **changes)
        validate_fp8_base(args)
        return dataclasses.replace(args, **dataclasses.asdict(self.resolved))

    def _setup_model(self, args: SftArgs, builder, resume_state: dict | None):
        """The trained model: base (loaded, given or built on meta), Liger, LoRA and patches, --fp8_base, a LoRA
        resume's adapters and folded base. Returns it and what the loss's set-up needs (`ModelParts`)."""
        from accelerate.utils import set_seed
        acc = self.accelerator
        dtype = train_dtype(args.dtype, acc.device)
        weights = self.resume if (self.resume and args.train_type == "full") else self.model_dir
        if builder is not None:
            check_given_model(args, weights, self.resume)
        self.meta = meta = is_random_init(weights)  # shape-only folder: weights built on meta, initialized sharded
        if meta and self.device_map:
            raise UserError(f"{weights} is a shape-only (random-init) model folder, built sharded per rank, and "
                            f"--device_map {self.device_map} would split it in one process",
                            "run it with NPROC_PER_NODE=<GPUs> and --fsdp 'full_shard auto_wrap', or pass --device_map none")
        if meta and self.resume is not None:
            raise UserError(f"{weights} is a random-init (shape-only) model folder, which cannot be resumed",
                            "start a new run, or train a model folder that holds weights")
        model = base_model(builder, args, weights, dtype, meta=meta, device=acc.device, device_map=self.device_map)
        if args.quant_bits:  # evaluations between steps must not repack the 4-bit weights for inference (CPU)
            from ocrtune.models.quant import keep_training_layout
            keep_training_layout(model)
        if resume_state is not None and "base_overlay" in resume_state:  # a --relora_steps run: its folded base
            ckpt_io.load_base_overlay(model, self.resume, resume_state.pop("base_overlay"))
        if self.device_map:
            n = len({str(d) for d in model.hf_device_map.values()})
            print(f"ocrtune: one process, the model's layers split over {n} GPUs (--device_map {self.device_map}); "
                  f"NPROC_PER_NODE={torch.cuda.device_count()} runs data parallel instead", flush=True)
        buffers = dist.real_buffers(model) if meta else None
        # Liger patches the unwrapped model, so it goes first; its fused CE is the loss's (below)
        liger = patches.prepare(model, PatchOptions(patch_embed=False, liger=True)) if self.resolved.use_liger else {}
        # the adapters' initial weights come from --seed whatever ran since set_seed: a preset built by this process
        # (resolve_model) seeds and draws its own random weights, and a run that built it started from other adapters
        # than the same run with the preset already in the cache
        set_seed(args.seed)
        trained = prepare_model(model, args)
        dist.wrap_classes_of(acc, trained)
        std = getattr(model.config.get_text_config(), "initializer_range", 0.02)
        if meta and dist.engine_name(acc) != "fsdp2":  # unsharded: materialize here, before the optimizer
            dist.materialize(trained, acc.device, buffers, std, args.seed)
        if args.fp8_base:  # after materializing: the float8 copies are made from real weights
            fp8_base(trained, acc.device, dtype, self.device_map, self.main)
        if resume_state is not None and "adapter" in resume_state:
            load_adapter(trained, resume_state.pop("adapter"), self.resume, args.lora_rank)
        fsdp2_meta = meta and dist.engine_name(acc) == "fsdp2"
        return trained, ModelParts(liger.get("fused_ce"), buffers if fsdp2_meta else None, std)

    def _setup_memory_plan(self, args: SftArgs) -> SftArgs:
        """On a GPU, a LoRA run that left recompute and the lean MLP to the defaults takes the fastest exact setting
        that fits its card (`memory_plan`), said in one line; the first steps check it (`train_step`)."""
        self.plan, self._plan_checks = None, 0
        if not memory_plan.wanted(args, self.accelerator.device, self.sharded or bool(self.device_map)):
            return args
        self.plan = memory_plan.plan_run(self.model, args, self.accelerator.device, self.train_ds.lengths)
        if self.plan is None:
            return args
        if self.main:
            print(memory_plan.plan_line(self.plan), file=sys.stderr, flush=True)
        return replaced(args, recompute_layers=self.plan.recompute, lean_mlp=self.plan.lean)

    def _check_memory_plan(self, step_tokens: int) -> None:
        self._plan_checks += 1
        better = memory_plan.check_step(self.plan, self.model, self.accelerator.device, step_tokens)
        if better is not None:
            self.plan, self.args = better, replaced(self.args, recompute_layers=better.recompute)
            if self.main:
                print(f"memory plan after step {self._plan_checks}: the activations measured {better.scale:.2f}x the "
                      f"model's; --recompute_layers {better.recompute} from the next step (the longest step predicted "
                      f"at {better.predicted / memory_plan.GIB:.1f} GiB)", file=sys.stderr, flush=True)

    def run_name(self) -> str:
        """The folder under --output_dir that holds this model's runs (SWIFT's layout)."""
        return self.spec.name if self.spec else Path(str(self.model_dir)).name

    def _setup_run_dir(self, args: SftArgs) -> Path:
        if self.resume:
            run_dir = self.resume.parent
        else:
            run_dir = new_run_dir(args, self.run_name())
        run_dir = Path(dist.from_main(self.accelerator, str(run_dir)))  # every rank writes to rank 0's folder
        if self.main:
            make_writable(run_dir)
            print(f"run folder: {run_dir}", flush=True)
        return run_dir

    def _setup_optimizer(self, args: SftArgs) -> tuple[torch.optim.Optimizer, LrSchedule]:
        optimizer, scheduler = make_optimizer(self.model, args, self.total_steps)
        return optimizer, LrSchedule(optimizer, scheduler, args)

    def _load_resume_state(self, resume_state: dict | None) -> dict | None:
        """A resume's position, step statistics, optimizer, scheduler and RNG state applied; returns the optimizer
        state a sharded run loads into its shards once they exist (`_setup_loss`)."""
        if resume_state is None:
            return None
        saved = resume_state.pop("trainer_state")
        self.stats = StepStats(*saved.pop("log_acc", StepStats().as_list()))
        self.state.update(saved)
        sharded_optimizer_state = resume_state.pop("optimizer.pt", {}) if self.sharded else None
        ckpt_io.apply_states(self.resume, resume_state, self.optimizer, self.schedule)
        return sharded_optimizer_state

    def _write_run_files(self, args: SftArgs) -> None:
        if self.main:  # only once the run (and a resume) is set up: a failed resume leaves args.json as it was
            write_run_files(self.run_dir, args, self.model_dir, self.template.template,
                            self.spec.name if self.spec else args.model_type)

    def _setup_loss(self, args: SftArgs, parts: ModelParts, sharded_optimizer_state: dict | None):
        """The loss module around the model, wrapped by accelerate (DDP, FSDP2, DeepSpeed) with the optimizer."""
        acc = self.accelerator
        loss_module = self._loss_module(args, parts)
        loss_module, optimizer = acc.prepare(loss_module, self.optimizer)
        if parts.meta_buffers is not None:  # FSDP2 on a shape-only folder: each rank initializes its shards only
            dist.materialize(loss_module, acc.device, parts.meta_buffers, parts.init_std, args.seed)
        if self.resume is not None and self.sharded:
            dist.load_optimizer_state(acc, loss_module, optimizer, self.resume, sharded_optimizer_state)
        if args.torch_compile:  # in place, after the wrappers (DDP, FSDP2): the blocks keep their names
            blocks = patches.prepare(loss_module, PatchOptions(patch_embed=False, compile=True))["compile"]
            if self.main:
                print(f"torch.compile: {blocks} blocks, compiled in the first steps", flush=True)
        return loss_module, optimizer

    def _loss_module(self, args: SftArgs, parts: ModelParts):
        """The module around the model that a step's forward runs (GRPO's run computes token log-probabilities)."""
        return ResponseLoss(self.model, args.loss_chunk_size, parts.fused_ce)

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        from tqdm import tqdm
        bar = tqdm(total=self.total_steps, initial=self.state["global_step"], desc="train", disable=not self.main,
                   dynamic_ncols=True, unit="step")
        try:
            with stop_on_sigterm() as signals:
                self.stop = StopRequest(signals, clock_decay=bool(self.args.lr_decay_seconds))
                # closed on the way out, an error's too: its loaders' workers ignore SIGTERM (see `make_loader`), so
                # a pool still alive at interpreter exit would keep multiprocessing's exit handler waiting for it
                with contextlib.closing(self.micro_batches()) as stream:
                    stopped_at = self._steps(bar, stream, self.stop)
        finally:
            bar.close()  # the bar's line ends before any error message is printed
            self.logger.close()
        if stopped_at is not None:  # SIGTERM (preemption, a scheduler's limit, `timeout`), Ctrl-C or --max_time
            self._report_stop(stopped_at)
            if self.stop.exit_status() is not None:
                raise SystemExit(self.stop.exit_status())
        return self.finish()

    def _steps(self, bar, stream, stop: StopRequest) -> int | None:
        """Train to the last step; returns the step it stopped after instead when `stop` asked it to."""
        args, st = self.args, self.state
        start, start_step = time.time(), st["global_step"]
        first = self.main  # the start-up line still to print (rank 0's)
        while st["global_step"] < self.total_steps:
            # where a signal inside this group takes the run back to (RNG only where a group has several micro-batches)
            group_start = (st["epoch"], st["micro_batches_done"],
                           ckpt_io.rng_state() if args.gradient_accumulation_steps > 1 else None)
            t_fetch = time.monotonic()
            try:
                group = self._next_group(stream)
                t_step = time.monotonic()
                stats = self.train_step(group)
            except StopMidGroup:
                return self.stop_mid_group(group_start)
            if first:  # one line on where the start-up went (compiling shows in the first step)
                first = False
                self._report_startup(bar, t_step - t_fetch, time.monotonic() - t_step)
            if stats is None:  # no rank had a row that encodes: no step
                continue
            st["global_step"] = step = st["global_step"] + 1
            self.stats += stats
            bar.update(1)
            last = step == self.total_steps or stop.decayed
            if step % args.logging_steps == 0 or last:
                self.log_train(step, start, start_step)
            if args.relora_steps and step % args.relora_steps == 0 and not last:
                self._relora_restart(bar, step)
            if stop.now and not last:
                self.save(None)  # at once, no evaluation first: a preempted or timed-out run keeps every step it made
                return step
            metrics = self._evaluate_and_log(bar, step) if self.val_ds is not None and (step % args.eval_steps == 0 or last) \
                else None
            if step % self.resolved.save_steps == 0 or last:
                self.save(metrics)
            if stop.decayed:
                if self.main:
                    bar.write(f"the learning rate decayed to 0 at --max_time {args.max_time:g}s (--lr_decay_seconds "
                              f"{args.lr_decay_seconds:g}): the run ends at step {step}")
                return None

    def _next_group(self, stream) -> list[dict | None]:
        """The next optimizer step's micro-batches (never spanning two epochs), the saved position moved past them.
        Raises StopMidGroup where a signal asks to stop between two of them."""
        st, group = self.state, []
        for _ in range(self.args.gradient_accumulation_steps):
            if self.signalled(len(group)):
                raise StopMidGroup
            epoch, done, size, batch = next(stream)  # the stream's position is the one saved
            st["epoch"], st["micro_batches_done"] = (epoch + 1, 0) if done >= size else (epoch, done)
            group.append(batch)  # None kept: train_step decides (the same on every rank)
            if batch is not None:
                self._filler = batch
            if done >= size:
                break
        return group

    def train_step(self, group: list[dict | None]) -> StepStats | None:
        """One optimizer step over `group`. A None micro-batch (every row of it failed to encode) is dropped in a
        single process; with several processes every rank must make the same collective calls (DDP's gradient
        all-reduce in backward, FSDP2/ZeRO-3's all-gathers in every forward), so it runs a filler batch with its
        loss multiplied by 0 instead: no gradient, no tokens, no loss or accuracy in the logs. Returns None (no
        step taken, on every rank alike) when no rank has a real row in the group."""
        acc, multi = self.accelerator, self.accelerator.num_processes > 1
        group, real = self._real_or_filler(group, multi)
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
            with contextlib.nullcontext() if last else acc.no_sync(self.loss_module), acc.autocast():
                l, _, c = self.loss_module(**batch)
                acc.backward(l * acc.num_processes / max(global_tokens, 1) if ok else l * 0)  # a filler: no gradient
            if ok:
                loss_sum, correct = loss_sum + l.detach().float(), correct + c
        acc.sync_gradients = True
        grad_norm = acc.clip_grad_norm_(self.loss_module.parameters(), self.args.max_grad_norm)
        grad_norm = 0.0 if grad_norm is None else grad_norm  # DeepSpeed without clipping reports none
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.plan is not None and self._plan_checks < memory_plan.CHECKED_STEPS:
            self._check_memory_plan(max(int(b["input_ids"].numel()) for b in group))
        elapsed = time.monotonic() - self.t_start
        if multi:  # log the global batch's loss, not this rank's share; every rank reads the same stop and clock
            loss_sum, correct, tokens, elapsed = self._reduce_step(loss_sum, correct, global_tokens, elapsed)
        else:
            self._update_stop(self.stop is not None and self.stop.requested, self._time_up())
        self.schedule.step(self.state["global_step"] + 1, elapsed)  # the next step's rate
        loss_sum = float(loss_sum)
        self.check_finite(loss_sum, float(grad_norm))
        return StepStats(loss_sum, int(tokens), int(correct), float(grad_norm), 1)

    def _real_or_filler(self, group: list[dict | None], multi: bool) -> tuple[list[dict], list[bool]]:
        """The group's batches and which are real: None ones dropped (one process) or filled in (several)."""
        real = [b is not None for b in group]
        if multi and not all(real):
            return [b if ok else self._train_filler() for b, ok in zip(group, real)], real
        group = [b for b in group if b is not None]
        return group, [True] * len(group)

    def _reduce_step(self, loss_sum, correct, global_tokens: int, elapsed: float):
        """One all-reduce for the step's loss and accuracy, the stop flags and the clock (the ranks' mean): a
        SIGTERM or --max_time seen by any rank stops every rank after this step (torchrun forwards a signal to each,
        not always within the same step; clocks differ), and --lr_decay_seconds reads the same clock on all."""
        acc = self.accelerator
        requested, time_up = self.stop is not None and self.stop.requested, self._time_up()
        stats = acc.reduce(torch.stack([torch.as_tensor(x, device=acc.device, dtype=torch.float64) for x in
                                        (loss_sum, correct, float(requested or time_up), float(requested),
                                         elapsed)]), "sum")
        self._update_stop(bool(stats[3] > 0), bool(stats[2] > 0))
        return stats[0], stats[1], global_tokens, float(stats[4]) / acc.num_processes

    def _update_stop(self, by_signal: bool, now: bool) -> None:
        if self.stop is not None:  # None outside train() (benchmarks call train_step directly)
            self.stop.by_signal, self.stop.now = by_signal, now or by_signal

    def _time_up(self) -> bool:
        return self.stop is not None and self.time_is_up()

    def time_is_up(self) -> bool:
        return self.args.max_time is not None and time.monotonic() - self.t_start >= self.args.max_time

    def signalled(self, i: int) -> bool:
        """Whether SIGTERM/SIGINT asks to stop before micro-batch `i` (> 0) of a group, so a long gradient
        accumulation can't hold a signal for minutes. Several processes decide together (a collective) every
        STOP_CHECK_EVERY micro-batches: the same on every rank, so none is left waiting in a collective."""
        if self.stop is None or i == 0:
            return False
        acc = self.accelerator
        if acc.num_processes == 1:
            return self.stop.requested
        if i % STOP_CHECK_EVERY:
            return False
        return bool(acc.reduce(torch.tensor(float(self.stop.requested), device=acc.device), "sum").item() > 0)

    def stop_mid_group(self, group_start: tuple) -> int:
        """A signal inside a group: its micro-batches are dropped (no optimizer step), the data position and RNG go
        back to the group's start, and the last completed step is saved (unless it already is; step 0 has nothing
        to save), so a resumed run redoes the group as if it had never stopped. Returns that step."""
        st = self.state
        st["epoch"], st["micro_batches_done"], rng = group_start
        self.optimizer.zero_grad(set_to_none=True)
        if rng is not None:
            ckpt_io.set_rng_state(rng)
        self.stop.now = self.stop.by_signal = True
        step = st["global_step"]
        if step and not (self.run_dir / f"checkpoint-{step}").exists():
            self.save(None)
        return step

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
        if self._filler is None:
            self._filler = first_good(self.train_ds, self.collator)
        if self._filler is None:
            raise UserError("no row of the training data can be encoded (too long or unreadable images)",
                            "raise --max_length, or use --check_dataset_strategy warning to see the bad rows")
        return self._filler

    def _relora_restart(self, bar, step: int) -> None:
        n = relora.fold_and_restart(self.accelerator.unwrap_model(self.loss_module).model, self.optimizer, self.args.seed + step)
        if self.main:
            bar.write(f"relora: {n} LoRA adapters folded into their base weights and restarted at step {step}")

    # ---------------------------------------------------------------- evaluation, logs, checkpoints
    def evaluate(self) -> dict:
        return evaluate(self.accelerator, self.loss_module, self.val_ds, self.collator, self.args, self._train_filler,
                        self.processor, self.template, self.sharded)

    def _evaluate_and_log(self, bar, step: int) -> dict:
        metrics = self.evaluate()
        self.logger.log({**metrics, "step": step, "global_step/max_steps": f"{step}/{self.total_steps}"})
        bar.write(json.dumps({**metrics, "step": step}))
        return metrics

    def _report_startup(self, bar, first_batch_s: float, first_step_s: float) -> None:
        su = self._startup
        bar.write(f"start-up: set-up {su['setup_s']:.1f} s (data {su['data_s']:.1f} s), first batch after "
                  f"{first_batch_s:.1f} s, first step {first_step_s:.1f} s"
                  + (" (compiling included)" if self.args.torch_compile else ""))

    def _report_stop(self, stopped_at: int) -> None:
        if self.main:
            print(self.stop.report(stopped_at, self.run_dir, self.args.max_time), file=sys.stderr, flush=True)

    def log_train(self, step: int, start: float, start_step: int) -> None:
        record = train_record(self.stats, self.optimizer.param_groups[0]["lr"], step, self.total_steps,
                              step - start_step, time.time() - start, self.epoch_progress())
        self.stats = StepStats()
        self.logger.log(record)

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
            ckpt_io.save_checkpoint(self.run_dir, step, model, optimizer, self.schedule,
                                    {**self.state, "log_acc": self.stats.as_list()}, self.processor,
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

    # ---------------------------------------------------------------- the data stream
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
        # epoch's loader exists, a filler batch (`first_good`, made in this process) takes that epoch's augmentation:
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


def run_sft(args: SftArgs) -> dict:
    finished = False
    try:
        result = SftRun(args).train()
        finished = True
        return result
    except BaseException as e:
        dist.record_rank_error(e)
        raise
    finally:
        dist.end_process_group(finished)
