"""Arguments of `ocrtune rlhf` (ms-swift's `swift rlhf --rlhf_type grpo` names): every sft flag (the model, LoRA,
optimizer, schedule, checkpoints, --resume_from_checkpoint, --max_time) plus GRPO's own."""
from __future__ import annotations

import math
from dataclasses import dataclass

from ocrtune.args import arg, ckpt_dir_arg, ints, max_new_tokens_arg, merge_lora_arg, positive, reals
from ocrtune.errors import UserError
from ocrtune.train.args import SftArgs

FIX = "see `ocrtune rlhf --help`"


@dataclass
class RlhfArgs(SftArgs):
    rlhf_type: str = arg("grpo", "the RLHF algorithm: grpo (Group Relative Policy Optimization)", choices=("grpo",))
    ckpt_dir: str | None = ckpt_dir_arg("start from an sft checkpoint: a LoRA checkpoint-N folder (its base model, "
                                        "see --merge_lora), a merged or full model folder, or a run folder (its newest "
                                        "checkpoint); instead of --model")
    merge_lora: bool = merge_lora_arg(True, "with a LoRA --ckpt_dir: true merges its adapter into the base weights and "
                                            "trains a new adapter (the KL reference is then the sft model); false goes on "
                                            "training the checkpoint's own adapter (with its LoRA shape; the KL reference "
                                            "is then the base model under it)")
    # the batch, counted in completions as TRL/ms-swift do: a micro-batch holds batch_size / num_generations prompts
    batch_size: int = arg(8, "completions per device per micro-batch: batch_size / num_generations prompts, each "
                          "sampled num_generations times", aliases=("--per_device_train_batch_size",), domain=ints(1, 65536))
    num_generations: int = arg(8, "completions sampled per prompt (the group whose rewards are normalized)",
                               domain=ints(2, 4096))
    max_completion_length: int = max_new_tokens_arg(512, "longest completion in tokens")
    temperature: float = arg(1.0, "sampling temperature (the log-probabilities are taken at it too)",
                             domain=positive(100))
    top_p: float = arg(1.0, "nucleus sampling: keep the smallest token set of this probability", domain=reals(0, 1, lo_open=True))
    epsilon: float = arg(0.2, "clip range of the policy ratio: [1 - epsilon, 1 + epsilon]", domain=positive(10))
    beta: float = arg(0.04, "weight of the KL penalty to the starting model (k3 estimator); 0: no KL and no reference "
                      "forward", domain=reals(0, 1e6))
    loss_type: str = arg("dapo", "normalization of the per-token loss: dapo (TRL's default: the mean over every completion "
                         "token of the optimizer step), bnpo (the mean over each micro-batch's tokens), grpo (each "
                         "completion's token mean, then the mean over completions)", choices=("dapo", "bnpo", "grpo"))
    reward_funcs: list[str] = arg(None, "rewards, summed with --reward_weights: cdm, edit_distance (1 - normalized token "
                                  "edit distance), bleu (sentence BLEU-4), exact (normalized exact match), format (the "
                                  "completion compiles as LaTeX), or a name from --external_plugins; default edit_distance")
    reward_weights: list[float] = arg(None, "one weight per --reward_funcs entry (default: 1.0 each)")
    external_plugins: list[str] = arg(None, "Python files whose reward functions become --reward_funcs names: each "
                                      "public function f(completions, solutions, **kwargs) -> list[float] by its name, "
                                      "and the entries of a dict `orms` (name -> function or class; ms-swift's convention)")
    # GRPO trains without a validation split: no evaluation between steps
    use_liger: bool | None = arg(False, "not used by rlhf (it needs per-token log-probabilities, not Liger's fused "
                                 "cross-entropy)", aliases=("--use_liger_kernel",))


def validate_rlhf(args: RlhfArgs) -> None:
    """The GRPO flags and the sft flags GRPO can't honour; UserError (one line) for the first bad one. The rewards
    (names, plugins) are checked by `rewards.resolve`."""
    g = args.num_generations
    checks = [
        (g >= 2, f"--num_generations must be at least 2, got {g} (the advantage is a reward against its group's mean)"),
        (args.batch_size % g == 0, f"--batch_size {args.batch_size} is not a multiple of --num_generations {g}: a "
         "micro-batch holds whole groups of completions"),
        (args.temperature > 0, f"--temperature must be positive, got {args.temperature} (GRPO samples)"),
        (0 < args.top_p <= 1, f"--top_p must be above 0 and at most 1, got {args.top_p}"),
        (args.beta >= 0, f"--beta must be 0 or more, got {args.beta}"),
        (args.epsilon > 0, f"--epsilon must be positive, got {args.epsilon}"),
        (args.max_completion_length >= 1, "--max_completion_length must be at least 1"),
        (not args.reward_weights or len(args.reward_weights) == len(args.reward_funcs or ["edit_distance"]),
         f"--reward_weights has {len(args.reward_weights or [])} values for {len(args.reward_funcs or ['edit_distance'])} "
         "--reward_funcs: give one weight per reward"),
        (all(math.isfinite(w) for w in args.reward_weights or []), f"--reward_weights {args.reward_weights} holds a "
         "value that is not a finite number (every advantage would be NaN)"),
        (not args.packing, "--packing is not supported by rlhf (completions are padded rows)"),
        (not args.predict_with_generate, "--predict_with_generate is not supported by rlhf (it has no evaluation)"),
        (not args.val_dataset and args.dataset_test_ratio is None, "--val_dataset and --dataset_test_ratio are not "
         "supported by rlhf (it has no evaluation: every --dataset row trains)"),
        (not (args.fsdp or args.deepspeed), "rlhf runs on one device or with DDP, not with --fsdp/--deepspeed (sampling "
         "needs the whole model)"),
        (not args.relora_steps, "--relora_steps is not supported by rlhf (the KL reference is the model under the adapter)"),
        (not args.use_liger, "--use_liger is not supported by rlhf (it needs per-token log-probabilities)"),
        (not args.torch_compile, "--torch_compile is not supported by rlhf (sampling runs the same blocks one token at a "
         "time, recompiling them)"),
        (not (args.train_type == "full" and args.beta > 0), f"--train_type full with --beta {args.beta}: the KL reference "
         "is the model with its LoRA adapter disabled, and full fine-tuning has none (no second copy is kept)"),
    ]
    for ok, message in checks:
        if not ok:
            fix = "pass --beta 0 or --train_type lora" if "--train_type full" in message else FIX
            raise UserError(message, fix)
