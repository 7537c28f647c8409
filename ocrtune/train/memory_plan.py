"""The exact speed settings a LoRA run takes by default on a GPU: how many decoder layers recompute their
activations in backward (`--recompute_layers`) and the lean SwiGLU MLP (`--lean_mlp`: gate and up kept for
backward, their product recomputed). Both change only memory and speed, never the loss or the gradients (tests:
test_speed_flags, test_lean_mlp), so a run takes the fastest that fits its card: fewest layers recomputing.

The plan is made once the model is built, before its first step, from three numbers: the memory the run will hold
before a step's activations (weights, adapters, and the optimizer state to come), the activation bytes a token costs per decoder layer
(from the model's shape) and the longest micro-batch the data can make (the packing budget, or the batch size
times the longest row). The step's activations are then predicted for that longest step, so a run that would run
out of memory later is known at the start. The first steps check it: their measured peak (memory reserved) scales the prediction,
and the count changes from the next step where the scaled prediction says so (more layers after any step that
measured more; fewer only after a step of at least half the longest one's tokens)."""
from __future__ import annotations

import dataclasses

import torch

from ocrtune.errors import UserError
from ocrtune.models import patches
from ocrtune.models.patches import PatchOptions

GIB = 2 ** 30
BF16 = 2
# per token, in [hidden]- and [intermediate]-sized bf16 tensors, what a decoder layer keeps for backward when it does
# not recompute: norms' inputs, q/k/v, attention output, residuals, LoRA inputs (~11 x hidden) and the MLP's gate, up
# and their product (3 x intermediate; --lean_mlp keeps 2); a layer that recomputes keeps ~3 x hidden (its input and
# what checkpointing saves beside it). Fitted to the measured peaks of Qwen2-VL-7B and 2B on H100/H200 (bench/results/
# frontier_7b_h200.json, frontier_2b_h200.json, frontier_7b_lean_mlp_triton.json), erring 2-9% high; the first steps'
# measured peak corrects what they miss (tests/test_memory_plan.py checks the fit)
KEEP_HIDDEN, KEEP_INTERMEDIATE, RECOMPUTE_HIDDEN = 11, 3, 3
OTHER_HIDDEN = 12  # outside the layers: embeddings, final norm, the loss's chunk, the frozen ViT's output
ADAM_BYTES = 4 + 8  # a float32 trainable parameter's gradient and AdamW's two moments, allocated at the first step
USABLE_SHARE, RESERVE = 0.92, 1 * GIB  # allocator slack, cuBLAS/NCCL workspaces, the evaluation's generation
CHECKED_STEPS = 2  # steps whose measured peak corrects the prediction (the first warms up kernels' workspaces)
MIN_SCALE = 0.8  # the activations are never taken for less than this share of the model's (a measurement's floor)


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int


def model_shape(model) -> Shape | None:
    """The language model's decoder shape, or None where its config does not say it."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    values = [getattr(config, k, None) for k in ("num_hidden_layers", "hidden_size", "intermediate_size")]
    return Shape(*values) if all(isinstance(v, int) and v > 0 for v in values) else None


def activation_bytes(shape: Shape, tokens: int, recompute: int, lean: bool) -> float:
    """Bytes a micro-batch of `tokens` keeps alive at the peak of its backward, with `recompute` of the
    layers recomputing (each keeps little; one at a time holds its whole activations again in its backward)."""
    layer = BF16 * (KEEP_HIDDEN * shape.hidden + (KEEP_INTERMEDIATE - int(lean)) * shape.intermediate)
    per_token = ((shape.layers - recompute) * layer + recompute * RECOMPUTE_HIDDEN * BF16 * shape.hidden
                 + OTHER_HIDDEN * BF16 * shape.hidden + (layer if recompute else 0))
    return float(tokens) * per_token


@dataclasses.dataclass(frozen=True)
class Plan:
    shape: Shape
    recompute: int      # layers that recompute (the first ones; the rest keep their activations)
    lean: bool          # --lean_mlp
    tokens: int         # the longest micro-batch the data can make
    static: float       # bytes held before a step's activations
    predicted: float    # static + the longest step's activations (times `scale`)
    usable: float       # what the card gives the run
    total: float        # the card's memory
    scale: float = 1.0  # measured / modelled activations, from the first steps (at least MIN_SCALE)

    @property
    def fits(self) -> bool:
        return self.predicted <= self.usable


def choose(shape: Shape, tokens: int, static: float, total: float, lean: bool, scale: float = 1.0) -> Plan:
    """The fastest plan that fits: the fewest recomputing layers whose longest step is predicted within the card's
    usable memory; every layer recomputing when none fits (`fits` then says so)."""
    usable = total * USABLE_SHARE - RESERVE
    for recompute in range(shape.layers + 1):
        predicted = static + scale * activation_bytes(shape, tokens, recompute, lean)
        if predicted <= usable or recompute == shape.layers:
            return Plan(shape, recompute, lean, tokens, static, predicted, usable, total, scale)
    raise AssertionError("unreachable")


def corrected(plan: Plan, step_tokens: int, peak: float) -> Plan | None:
    """After a step of `step_tokens` tokens whose measured peak was `peak` bytes: the plan again with the
    activations scaled to what was measured, where that changes the count (else None). More layers recompute after
    any step that measured more than predicted; fewer only after a step of at least half the longest step's tokens
    (a short one is no evidence for the longest), and the scale never goes below MIN_SCALE."""
    shape = plan.shape
    expected = activation_bytes(shape, step_tokens, plan.recompute, plan.lean)
    if step_tokens <= 0 or expected <= 0:
        return None
    measured = (peak - plan.static) / expected  # the activations as a share of the model's
    representative = 2 * step_tokens >= plan.tokens
    scale = max(MIN_SCALE, measured) if representative else max(plan.scale, measured)
    again = choose(shape, plan.tokens, plan.static, plan.total, plan.lean, scale)
    return again if again.recompute != plan.recompute else None


def plan_line(plan: Plan) -> str:
    lean = "--lean_mlp true " if plan.lean else ""
    return (f"memory plan: {lean}--recompute_layers {plan.recompute} (of {plan.shape.layers}): the longest step, "
            f"{plan.tokens:,} tokens, predicted at {plan.predicted / GIB:.1f} GiB of the card's {plan.total / GIB:.1f} "
            f"({plan.usable / GIB:.1f} usable); --recompute_layers or --gradient_checkpointing choose instead")


def longest_micro_batch(args, lengths) -> int:
    """The most tokens one micro-batch can hold: the packing budget, or (padded batches) the batch size times
    the longest row."""
    if args.packing and args.packing_tokens:
        return int(args.packing_tokens)
    longest = max(lengths or [0]) or args.max_length
    return int(args.batch_size) * int(longest)


# the flags that choose by hand what the plan would choose
OWN_FLAGS = frozenset({"recompute_layers", "gradient_checkpointing", "lean_mlp", "lean_mlp_fp8"})


def wanted(args, device, split: bool) -> bool:
    """Whether a run plans: LoRA on one CUDA device per process (DDP included; not sharded or split by
    --device_map), gradient checkpointing on by default, none of OWN_FLAGS given, no 4-bit base (its lean MLP is
    refused), no rlhf (its micro-batches are completions)."""
    from ocrtune.args import given_flags
    return (device.type == "cuda" and args.train_type == "lora" and args.gradient_checkpointing
            and not (OWN_FLAGS & given_flags(args)) and args.recompute_layers is None
            and not (args.lean_mlp or args.lean_mlp_fp8 or args.quant_bits or split
                     or getattr(args, "rlhf_type", None)))


def plan_run(model, args, device, lengths) -> Plan | None:
    """Plan `model`'s run on `device` and apply it: the lean MLP on every layer it fits, then the recompute
    count. `lengths()` gives the rows' token counts (asked only for padded batches). A longest step that can't fit
    even with every layer recomputing is refused here, not at its step."""
    shape = model_shape(model)
    if shape is None:
        return None
    lean = patches.prepare(model, PatchOptions(patch_embed=False, lean_mlp=True))["lean_mlp"] == shape.layers
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the weights may still be on the host (the run moves them to the card when it wraps the model)
    static = max(torch.cuda.memory_allocated(device), model_bytes(model)) + trainable * ADAM_BYTES
    total = card_memory(device)
    tokens = longest_micro_batch(args, None if args.packing and args.packing_tokens else lengths())
    plan = choose(shape, tokens, static, total, lean)
    if not plan.fits:
        raise UserError(f"the longest micro-batch ({tokens:,} tokens) needs about {plan.predicted / GIB:.1f} GiB with "
                        f"every layer recomputing, more than this GPU's {total / GIB:.1f} GiB",
                        "lower --packing_tokens (or --batch_size / --max_length), or pass --recompute_layers "
                        f"{shape.layers} to try anyway")
    patches.prepare(model, PatchOptions(patch_embed=False, recompute_layers=plan.recompute))
    torch.cuda.reset_peak_memory_stats(device)
    return plan


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def card_memory(device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def check_step(plan: Plan, model, device, step_tokens: int) -> Plan | None:
    """After a step whose longest micro-batch held `step_tokens` tokens: the plan corrected by the step's measured
    peak and applied, where that changes the count (else None)."""
    # reserved, not allocated: what the allocator holds (its fragmentation included) is what the card must fit
    better = corrected(plan, step_tokens, torch.cuda.max_memory_reserved(device))
    if better is not None:
        patches.prepare(model, PatchOptions(patch_embed=False, recompute_layers=better.recompute))
        torch.cuda.empty_cache()  # the next step's reserved peak is its own, not this step's left in the cache
    torch.cuda.reset_peak_memory_stats(device)
    return better
