"""The learning rate of each step, from one object (`LrSchedule`) composed of its parts: the step schedule
(warm-up, then cosine/linear/constant: transformers' scheduler, whose state the checkpoints hold), ReLoRA's warm
restarts (`relora.lr_factor`) and the clock decay (`--lr_decay_seconds`, `time_decay`).

The clock decay: a run whose steps' pace is not known in advance (its first steps compile, its loader's pace depends
on the host's cores, the data mix changes the step) can't plan a cosine over steps and still end annealed at its
deadline. Its multiplier holds 1, then follows a cosine to 0 that ends exactly at `--max_time`, on top of the step
schedule (warm-up, then `constant` for a warm-up/stable/decay run)."""
from __future__ import annotations

import math

from ocrtune.train import relora


def time_decay(elapsed: float, end: float, decay_seconds: float, first_step_at: float) -> float:
    """The multiplier `elapsed` seconds into the process: 1 until `decay_seconds` before `end`, then a cosine to 0
    at `end`. A decay that would start before the first step ended (`first_step_at`: start-up, compiling and the
    first batches took longer) starts there instead, so the whole decay is trained, only shorter."""
    start = max(end - decay_seconds, first_step_at)
    if elapsed <= start:
        return 1.0
    if elapsed >= end or end <= start:
        return 0.0
    return 0.5 * (1.0 + math.cos(math.pi * (elapsed - start) / (end - start)))


def relora_warmup(args) -> int:
    """--relora_warmup_steps, by default a tenth of --relora_steps."""
    return args.relora_warmup_steps if args.relora_warmup_steps is not None else max(1, args.relora_steps // 10)


class LrSchedule:
    """The optimizer's rate after each step: `scheduler`'s (the step schedule) times ReLoRA's warm-up after each
    restart times the clock decay. Checkpoints save and load `scheduler`'s state alone (`state_dict`), as before
    these parts were one object: the factors are recomputed from the step and the clock."""

    def __init__(self, optimizer, scheduler, args):
        self.optimizer, self.scheduler = optimizer, scheduler
        self.relora_steps, self.relora_warmup = args.relora_steps, relora_warmup(args) if args.relora_steps else 0
        self.max_time, self.decay_seconds = args.max_time, args.lr_decay_seconds
        self.first_step_at = None  # seconds after set-up when this process's first step ended (the decay's floor)

    def step(self, steps_done: int, elapsed: float) -> None:
        """After optimizer step number `steps_done`, `elapsed` seconds after set-up: the next step's rate."""
        self.scheduler.step()
        factor = self.factor(steps_done, elapsed)
        if factor != 1.0:
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = lr * factor

    def factor(self, steps_done: int, elapsed: float) -> float:
        """The multiplier of the step schedule's rate for the step after `steps_done`."""
        factor = 1.0
        if self.relora_steps:
            factor *= relora.lr_factor(steps_done, self.relora_steps, self.relora_warmup)
        if self.decay_seconds:
            if self.first_step_at is None:
                self.first_step_at = elapsed
            factor *= time_decay(elapsed, self.max_time, self.decay_seconds, self.first_step_at)
        return factor

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
