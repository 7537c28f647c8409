"""Moved to `ocrtune.checkpoint` (the checkpoint format) and `ocrtune.train.resume` (which settings a resumed
run keeps); issue 14. Re-exported here so existing imports keep working."""
from __future__ import annotations

from ocrtune.checkpoint import (  # noqa: F401  (moved; issue 14)
    CKPT_RE, STATE_FILE, _as_tuple, _fsync_dir, _torch_load, apply_states, check_safetensors, check_weights, corrupt,
    find_resume_checkpoint, list_checkpoints, load_trainer_state, read_resume_state, remove_interrupted_saves,
    rng_state, rotate_checkpoints, save_checkpoint, set_rng_state)
from ocrtune.train.resume import RESUME_AUTO, RESUME_SAFE, _differs, _show, resume_args  # noqa: F401  (moved; issue 14)
