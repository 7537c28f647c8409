"""The learning rate by the clock (`--lr_decay_seconds`): a run whose steps' pace is not known in advance (its first
steps compile, its loader's pace depends on the host's cores, the data mix changes the step) can't plan a cosine over
steps and still end annealed at its deadline. This multiplier holds 1, then follows a cosine to 0 that ends exactly at
`--max_time`, on top of the step schedule (warm-up, then `constant` for a warm-up/stable/decay run)."""
from __future__ import annotations

import math


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
