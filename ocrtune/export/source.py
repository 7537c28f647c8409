"""What a `--ckpt_dir` is, and which base model and run settings go with it: moved to `ocrtune.checkpoint`
(the one checkpoint-format module; issue 14). Re-exported here so existing imports keep working."""
from __future__ import annotations

from ocrtune.checkpoint import (  # noqa: F401  (moved; issue 14)
    INFER_KEYS, MERGE_INFO, RUN_ARGS, Source, _spec_or_none, base_model, describe, file_sha256, log, read_json,
    run_args_for)
