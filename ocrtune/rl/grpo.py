"""`ocrtune rlhf --rlhf_type grpo`: Group Relative Policy Optimization (DeepSeekMath; TRL's GRPOTrainer and ms-swift's
`swift rlhf --rlhf_type grpo` spell the same flags) on `SftRun`'s parts: its set-up, optimizer, schedule, checkpoints,
resume, stop request and logger. Only what a step does differs:

1. a micro-batch is `batch_size / num_generations` prompts (image + user text) of the dataset, their answers the
   references; each prompt is sampled `num_generations` times by the policy (the model with its adapter,
   `InferEngine.generate_answers` with temperature/top_p, no gradients), the sampling seeded by the step so that
   a resumed run draws the same completions;
2. the rewards (`rewards.py`, weighted sum) give each completion a score, and each group of one prompt's
   completions turns its scores into advantages (r - mean) / (std + 1e-4) (TRL's `scale_rewards="group"`);
3. the loss is PPO's clipped surrogate per completion token, plus `beta` times the k3 estimate of the KL to the
   reference (the same weights with the LoRA adapter disabled: no second model), averaged as `--loss_type` says.

One optimizer step per generation batch: the old policy is the current one (ratio 1, its gradient the policy
gradient); the clip is kept in the loss, for the day a batch is reused (`num_iterations`)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ocrtune import checkpoint as ckpt_io
from ocrtune.args import given_flags, replaced
from ocrtune.data.images import BadImage
from ocrtune.data.packing import IGNORE_INDEX
from ocrtune.data.pixels import to_device
from ocrtune.errors import UserError
from ocrtune.fileio import check_not_input
from ocrtune.models.template import SampleTooLong
from ocrtune.rl import rewards as rw
from ocrtune.rl.args import RlhfArgs, validate_rlhf
from ocrtune.train import distributed as dist
from ocrtune.train.data import build_data, epoch_batches
from ocrtune.train.logger import StepStats, train_record
from ocrtune.train.loss import ResponseLoss
from ocrtune.train.stopping import StopMidGroup
from ocrtune.train.trainer import SftRun

log = logging.getLogger("ocrtune")

ADV_EPS = 1e-4  # TRL's and ms-swift's: a group whose rewards tie gets advantage 0, not 0/0


# ---------------------------------------------------------------- the math
def group_advantages(rewards: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, each completion's group std) of rewards [N] laid out as consecutive groups of `group`
    completions of one prompt: (r - group mean) / (group std + 1e-4), the std unbiased as torch's default."""
    r = rewards.view(-1, group)
    mean, std = r.mean(dim=1, keepdim=True), r.std(dim=1, keepdim=True)
    return ((r - mean) / (std + ADV_EPS)).reshape(-1), std.expand_as(r).reshape(-1)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, epsilon: float, beta: float, loss_type: str = "dapo",
              num_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """GRPO's loss over [B, T] per-token log-probabilities of the completions (`mask`: the completion tokens):
    -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * (exp(ref - logp) - (ref - logp) - 1), with
    ratio = exp(logp - old_logp) and A the completion's advantage. `loss_type` "dapo"/"bnpo" divide the sum over
    the masked tokens by `num_tokens` (default: this batch's), "grpo" averages each completion's tokens, then the
    completions. Returns (loss, {"kl": masked token mean or None, "clip_ratio": share of tokens clipped,
    "tokens": masked tokens}) with the statistics as floats."""
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = advantages.to(logp.dtype).unsqueeze(1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    per_token = -torch.min(ratio * a, clipped * a)
    kl = None
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs the reference log-probabilities")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    tokens = m.sum()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
    elif loss_type in ("dapo", "bnpo"):
        loss = (per_token * m).sum() / (num_tokens if num_tokens is not None else tokens.clamp(min=1))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    with torch.no_grad():
        region = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon) & (a > 0))
        n = float(tokens.clamp(min=1))
        stats = {"kl": float((kl * m).sum()) / n if kl is not None else None,
                 "clip_ratio": float((region.to(m.dtype) * m).sum()) / n, "tokens": float(tokens)}
    return loss, stats


def _logp_chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = F.linear(h, weight).float() / temperature
    return -F.cross_entropy(logits, y, reduction="none")


class TokenLogprobs(ResponseLoss):
    """The model's forward (ResponseLoss's: frozen ViT without autograd, only the completion positions' logits,
    in chunks recomputed in backward) returning ([B, T-1] log-probability of each next token at `temperature`,
    0 outside the completions; [B, T-1] mask of the completion tokens)."""

    def __init__(self, model, chunk_size: int = 2048, temperature: float = 1.0):
        super().__init__(model, chunk_size)
        self.temperature = temperature

    def _loss(self, lm, last_hidden_state, labels):
        keep = labels[:, 1:] != IGNORE_INDEX
        h, y = last_hidden_state[:, :-1][keep], labels[:, 1:][keep]
        weight, parts = lm.lm_head.weight, []
        for s in range(0, h.shape[0], self.chunk_size):
            args = (h[s:s + self.chunk_size], weight, y[s:s + self.chunk_size], self.temperature)
            grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
            parts.append(checkpoint(_logp_chunk, *args, use_reentrant=False) if grad else _logp_chunk(*args))
        out = torch.zeros(keep.shape, dtype=torch.float32, device=h.device)
        out[keep] = torch.cat(parts) if parts else out.new_zeros(0)
        return out, keep


# ---------------------------------------------------------------- one generation batch
@dataclasses.dataclass
class Rollout:
    """One micro-batch's sampled completions, ready for the loss: the padded prompt + completion rows (CPU), the
    advantages, and what the step logs."""
    batch: dict
    advantages: torch.Tensor
    tokens: int  # completion tokens (the loss's mask)
    rewards: torch.Tensor  # [N] weighted sums
    per_func: torch.Tensor  # [rewards, N]
    group_std: torch.Tensor  # [N]
    lengths: list[int]


def answer_of(row: dict) -> str:
    """The reference: the row's last assistant message."""
    msgs = [m for m in row["messages"] if m["role"] == "assistant"]
    return msgs[-1]["content"] if msgs else ""


class GrpoRun(SftRun):
    """`SftRun` with GRPO's step. `data` and `model` are SftRun's builders; the validation split is not used."""

    def __init__(self, args: RlhfArgs, data=None, model=None):
        self._builder = None  # the base model's builder for a LoRA --ckpt_dir (merged into the base)
        self._sft_adapter: Path | None = None  # a LoRA --ckpt_dir whose adapter trains on (--merge_lora false)
        self._sft_run_name: str | None = None  # the model folder of a --ckpt_dir's sft run: the GRPO run goes beside it
        self.ref_forwards = 0  # reference forwards made (none with --beta 0)
        self._skipped: set[int] = set()  # rows that failed to encode (warned once each)
        self._empty_groups = 0  # optimizer steps in a row with no row that encodes
        super().__init__(args, data=_train_only(data or build_data), model=model)
        from ocrtune.models.generate import InferEngine
        self.engine = InferEngine(self.model, self.processor, self.template, workers=0)

    # ---------------------------------------------------------------- set-up
    def _setup_resume(self, args: RlhfArgs):
        args, resume_state = super()._setup_resume(args)  # a resume's settings are the run's (its rewards too)
        validate_rlhf(args)
        self.rewards = rw.resolve(args.reward_funcs, args.reward_weights, args.external_plugins, args.tex_root)
        self.state.setdefault("rl_log", {})
        return self._from_ckpt_dir(args), resume_state

    def _from_ckpt_dir(self, args: RlhfArgs) -> RlhfArgs:
        """--ckpt_dir: a model folder is the --model; a LoRA checkpoint's base model is, with its adapter merged
        in by the model builder (--merge_lora true) or loaded into the run's adapter (false: its LoRA shape)."""
        if not args.ckpt_dir:
            return args
        from ocrtune.models.source import base_model
        src = ckpt_io.describe(args.ckpt_dir)
        run = src.path.parent
        if (run / "args.json").is_file() and run.parent.name:  # <output_dir>/<model>/v<N>-<time>/checkpoint-<step>
            self._sft_run_name = run.parent.name
        # the run writes nothing into the checkpoint it starts from (a LoRA one's --model is its base, not it)
        check_not_input("--output_dir", args.output_dir, [("--ckpt_dir", Path(args.ckpt_dir).expanduser()),
                                                          ("--ckpt_dir's checkpoint", src.path)])
        if src.kind != "lora":
            return replaced(args, model=str(src.path))
        weights_dir, _ = base_model(src, args.model, args.model_type, args.use_hf)
        changes = {"model": str(weights_dir)}
        if args.merge_lora:
            if args.quant_bits:
                raise UserError(f"--quant_bits {args.quant_bits} with a LoRA --ckpt_dir merged into its base (--merge_lora "
                                "true): the merge needs the unquantized weights", "pass --merge_lora false to train the "
                                "checkpoint's adapter over the quantized base, or drop --quant_bits")
            if not (self.resume and args.train_type == "full"):  # a full run's resume loads its own weights
                self._builder = merged_builder(src.path)
        else:
            if (src.path / ckpt_io.BASE_OVERLAY).exists():
                raise UserError(f"{src.path} is a --relora_steps checkpoint (its base weights were folded), whose adapter "
                                "only fits that folded base", "pass --merge_lora true")
            if args.train_type != "lora":
                raise UserError("--merge_lora false trains the LoRA checkpoint's adapter, and --train_type is "
                                f"{args.train_type}", "pass --train_type lora, or --merge_lora true")
            shape = ("lora_rank", "lora_alpha", "lora_dropout", "target_modules", "modules_to_save")
            given = given_flags(args)
            for k in shape:
                if k in given and k in src.run_args and getattr(args, k) != src.run_args[k]:
                    raise UserError(f"--{k} {getattr(args, k)} with --merge_lora false: the checkpoint's adapter has "
                                    f"--{k} {src.run_args[k]}, and the run trains that adapter on",
                                    f"drop --{k}, or pass --merge_lora true to train a new adapter over the merged model")
            changes.update({k: src.run_args[k] for k in shape if k in src.run_args and k not in given})
            self._sft_adapter = src.path
        return replaced(args, **changes)

    def run_name(self) -> str:
        return self._sft_run_name or super().run_name()

    def _setup_template(self, args: RlhfArgs) -> RlhfArgs:
        """sft's, plus --max_completion_length within the model's positions (as infer's --max_new_tokens): past
        them sampling runs on for nothing, before the model is loaded."""
        from ocrtune.models.loading import check_new_tokens
        args = super()._setup_template(args)
        try:
            check_new_tokens(self.model_dir, args.max_completion_length)
        except UserError as e:
            raise UserError(str(e).replace("--max_new_tokens", "--max_completion_length")) from None
        return args

    def _setup_accelerator(self, args, given_model: bool) -> None:
        super()._setup_accelerator(args, given_model or self._builder is not None)

    def _setup_model(self, args, builder, resume_state):
        model, parts = super()._setup_model(args, builder or self._builder, resume_state)
        if self._sft_adapter is not None and self.resume is None:  # a resume has its own adapter already
            from safetensors.torch import load_file

            from ocrtune.train.resume import load_adapter
            load_adapter(model, load_file(self._sft_adapter / "adapter_model.safetensors"), self._sft_adapter,
                         args.lora_rank)
        return model, parts

    def _loss_module(self, args: RlhfArgs, parts):
        return TokenLogprobs(self.model, args.loss_chunk_size, args.temperature)

    # ---------------------------------------------------------------- the data: prompts, not encoded samples
    def epoch_plan(self, epoch: int) -> list[list[int]]:
        acc, args = self.accelerator, self.args
        plan = epoch_batches(len(self.train_ds), args.batch_size // args.num_generations, args.seed, epoch,
                             acc.process_index, acc.num_processes)
        if not plan:
            raise UserError("the training data has no rows", "pass a --dataset with rows")
        self._epoch_sizes[epoch] = len(plan)
        return plan

    def epoch_loader(self, epoch: int, skip: int):
        batches = self.epoch_plan(epoch)
        return batches, iter(batches[skip:])  # row indices: each step samples its own completions

    # ---------------------------------------------------------------- the step
    def train_step(self, group: list) -> StepStats | None:
        """One optimizer step: sample and score every micro-batch of `group` (lists of row indices), then the
        loss's forward and backward over each. None (no step) when no prompt of the group can be encoded."""
        acc, args = self.accelerator, self.args
        self._seed_sampling(self.state["global_step"])
        rollouts = [r for r in (self.rollout(idx) for idx in group if idx) if r is not None]
        if acc.num_processes > 1:  # the same number of micro-batches on every rank, so their collectives line up
            n = torch.tensor(len(rollouts), device=acc.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
            rollouts = rollouts[:int(n)]  # a rank whose rows failed to encode shortens the step for all
        if not rollouts:
            self._check_some_row_encodes()
            return None
        self._empty_groups = 0
        step_tokens = sum(r.tokens for r in rollouts)
        per_batch = 1.0 / len(rollouts)  # bnpo and grpo: the mean over the step's micro-batches
        loss_sum, kls, clips = 0.0, [], []
        self.loss_module.train()
        for i, r in enumerate(rollouts):
            if self.signalled(i):
                raise StopMidGroup
            batch = to_device(r.batch, acc.device, self.collator.pixel_dtype)
            ref = self.reference_logprobs(batch) if args.beta > 0 else None
            last = i == len(rollouts) - 1
            acc.sync_gradients = last
            with contextlib.nullcontext() if last else acc.no_sync(self.loss_module), acc.autocast():
                logp, mask = self.loss_module(**batch)
                loss, stats = grpo_loss(logp, logp.detach(), ref, r.advantages.to(logp.device), mask, args.epsilon,
                                        args.beta, args.loss_type, step_tokens if args.loss_type == "dapo" else None)
                if args.loss_type != "dapo":
                    loss = loss * per_batch
                acc.backward(loss)
            loss_sum += float(loss.detach())
            clips.append((stats["clip_ratio"], stats["tokens"]))
            if stats["kl"] is not None:
                kls.append((stats["kl"], stats["tokens"]))
        acc.sync_gradients = True
        grad_norm = acc.clip_grad_norm_(self.loss_module.parameters(), args.max_grad_norm)
        grad_norm = 0.0 if grad_norm is None else float(grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.monotonic() - self.t_start
        if acc.num_processes > 1:
            loss_t, _, _, elapsed = self._reduce_step(loss_sum, 0, 1, elapsed)
            loss_sum = float(loss_t) / acc.num_processes
        else:
            self._update_stop(self.stop is not None and self.stop.requested, self._time_up())
        self.schedule.step(self.state["global_step"] + 1, elapsed)
        self.check_finite(loss_sum, grad_norm)
        self._record(rollouts, kls, clips)
        return StepStats(loss_sum, 1, 0, grad_norm, 1)

    def _check_some_row_encodes(self) -> None:
        """A whole epoch of steps without a row that encodes: none ever will (the loop would spin forever, deaf
        to SIGTERM, which is only heard between steps); one line, as sft says it."""
        self._empty_groups += 1
        if self._empty_groups > self.steps_in_epoch(self.state["epoch"]):
            raise UserError(f"no training row fits: every --dataset row is over --max_length {self.args.max_length} "
                            "or has an image that can't be read", "raise --max_length, lower --max_pixels, or check "
                            "the data with --check_dataset_strategy error")

    def _seed_sampling(self, step: int) -> None:
        """Seed the step's sampling (and its dropout) from --seed, the step and the rank: a resumed run samples
        the completions the uninterrupted run sampled at that step."""
        seed = (self.args.seed * 1_000_003 + step * 7919 + self.accelerator.process_index) % 2**63
        torch.manual_seed(seed)

    def rollout(self, indices: list[int]) -> Rollout | None:
        """Sample, score and lay out one micro-batch of prompts; None when none of them can be encoded."""
        args, g = self.args, self.args.num_generations
        prompts, solutions, texts = [], [], []
        for i in indices:
            row = self.train_ds.rows[int(i)]
            try:
                prompts.append(self.engine.encode_prompt(row))
            except (SampleTooLong, BadImage, ValueError) as e:
                if int(i) not in self._skipped:  # once a row, not once an epoch
                    self._skipped.add(int(i))
                    log.warning("row %d skipped: %s", int(i), e)
                continue
            solutions.append(answer_of(row))
            texts.append(" ".join(str(m["content"]) for m in row["messages"] if m["role"] == "user"))
        if not prompts:
            return None
        acc = self.accelerator
        with acc.unwrap_model(self.loss_module).autocast(acc.device.type):  # the LoRA branch as in training
            answers = self.engine.generate_answers([p for p in prompts for _ in range(g)], args.max_completion_length,
                                                   temperature=args.temperature, top_p=args.top_p)
        completions = [a.text for a in answers]
        refs = [s for s in solutions for _ in range(g)]
        scores = rw.score(self.rewards, completions, refs, prompts=[t for t in texts for _ in range(g)])
        per_func = torch.tensor(scores, dtype=torch.float32).reshape(len(self.rewards), -1)
        weights = torch.tensor([r.weight for r in self.rewards], dtype=torch.float32)
        total = (per_func * weights[:, None]).sum(dim=0)
        advantages, group_std = group_advantages(total, g)
        if not (torch.isfinite(total).all() and torch.isfinite(advantages).all()):  # finite values, overflowing sums
            raise UserError(f"the weighted rewards overflow float32 (largest |value| {max(abs(v) for vs in scores for v in vs):.3g})",
                            "scale the rewards (or --reward_weights) to moderate values, e.g. within [-1e6, 1e6]")
        samples = [_sample(p, a.ids or (self.processor.tokenizer.pad_token_id,))
                   for p, a in zip([p for p in prompts for _ in range(g)], answers)]
        lengths = [len(a.ids) for a in answers]
        return Rollout(self.collator(samples), advantages, sum(max(n, 1) for n in lengths), total, per_func, group_std,
                       lengths)

    def reference_logprobs(self, batch: dict) -> torch.Tensor:
        """The completions' log-probabilities under the starting model: the same module with the LoRA adapter
        disabled, no gradients (never a second copy of the weights)."""
        self.ref_forwards += 1
        module = self.accelerator.unwrap_model(self.loss_module)
        with torch.no_grad(), module.model.disable_adapter(), self.accelerator.autocast():
            return module(**batch)[0]

    # ---------------------------------------------------------------- logs
    def _record(self, rollouts: list[Rollout], kls: list, clips: list) -> None:
        """Add this step's numbers to the ones logged next (kept in the checkpoints' trainer state)."""
        total = torch.cat([r.rewards for r in rollouts])
        per_func = torch.cat([r.per_func for r in rollouts], dim=1)
        step = {"reward": float(total.mean()), "reward_std": float(torch.cat([r.group_std for r in rollouts]).mean()),
                "completion_length": sum(sum(r.lengths) for r in rollouts) / max(1, sum(len(r.lengths) for r in rollouts)),
                "clip_ratio": _weighted(clips)}
        if kls:
            step["kl"] = _weighted(kls)
        for j, reward in enumerate(self.rewards):
            step[f"reward/{reward.name}/mean"] = float(per_func[j].mean())
            step[f"reward/{reward.name}/std"] = float(per_func[j].std()) if per_func.shape[1] > 1 else 0.0
        acc = self.state.setdefault("rl_log", {})
        for k, v in step.items():
            s, n = acc.get(k, (0.0, 0))
            acc[k] = (s + v, n + 1)

    def log_train(self, step: int, start: float, start_step: int) -> None:
        record = train_record(self.stats, self.optimizer.param_groups[0]["lr"], step, self.total_steps,
                              step - start_step, time.time() - start, self.epoch_progress())
        record.pop("token_acc", None)
        means = {k: round(s / max(n, 1), 6) for k, (s, n) in self.state.get("rl_log", {}).items()}
        self.stats, self.state["rl_log"] = StepStats(), {}
        self.logger.log({"loss": record.pop("loss"), **means, **record})


def _weighted(pairs: list[tuple[float, float]]) -> float:
    n = sum(t for _, t in pairs)
    return sum(v * t for v, t in pairs) / n if n else 0.0


def _sample(prompt: dict, ids) -> dict:
    """A prompt + completion row, its labels the completion tokens (what the log-probabilities are taken of)."""
    ids = list(ids)
    sample = {"input_ids": list(prompt["input_ids"]) + ids,
              "labels": [IGNORE_INDEX] * len(prompt["input_ids"]) + ids,
              "mm_token_type_ids": list(prompt["mm_token_type_ids"]) + [0] * len(ids)}
    return {**{k: v for k, v in prompt.items() if k not in sample}, **sample}


def _train_only(build):
    """A data builder without a validation split (GRPO does not evaluate between steps): every row of --dataset
    trains, and no validation rows are read or checked."""
    def data(args, template, accelerator):
        return build(dataclasses.replace(args, val_dataset=None, dataset_test_ratio=0.0), template, accelerator)[0], None
    return data


def merged_builder(adapter: Path):
    """A model builder (SftRun's `model`): the base model with a LoRA checkpoint's adapter merged into its weights
    (and a ReLoRA run's folded base), so the run's new adapter starts from, and its KL reference is, the sft model."""
    def build(args, weights, dtype):
        from peft import PeftModel

        from ocrtune.compat import quiet_peft_deprecations
        from ocrtune.models.loading import load_model
        model = load_model(weights, dtype, args.attn_impl)
        ckpt_io.load_base_overlay(model, adapter)
        try:
            with quiet_peft_deprecations():
                merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            return merged.requires_grad_(True)  # as loaded: the run decides what trains (PEFT froze the base)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise UserError(f"the adapter in {adapter} does not fit the base model {weights}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}", "pass the base model it was trained on with --model") from None
    return build


def run_grpo(args: RlhfArgs) -> dict:
    try:
        return GrpoRun(args).train()
    except BaseException as e:
        dist.record_rank_error(e)
        raise
    finally:
        dist.end_process_group()
