"""Resuming an sft run: which of its saved settings a resumed run keeps, and which flags may change.

The checkpoint files themselves (write, read, resolve `last`) are `ocrtune.checkpoint`.
"""
from __future__ import annotations

from pathlib import Path

from ocrtune.data.fingerprint import check_unchanged
from ocrtune.errors import UserError


# Flags a resumed run may change: they decide what is logged, evaluated, kept and where, or how fast
# the same math runs. Everything else (model, data, lr, schedule, steps, batch sizes, seed, LoRA
# shape...) decides which updates the run makes, so it comes from the run's args.json.
RESUME_SAFE = frozenset({
    "resume_from_checkpoint", "output_dir", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
    "report_to", "predict_with_generate", "max_new_tokens", "eval_batch_size", "dataloader_num_workers",
    "use_liger", "attn_impl", "fused_lora", "lean_mlp", "recompute_layers", "loss_chunk_size", "gradient_checkpointing",
    "torch_compile", "max_time", "lr_decay_seconds", "allow_data_change",
})
# resolved per machine ("auto"), or a limit of the process that saved the run (--lr_decay_seconds ends with that
# process's --max_time): not taken from the saved run
RESUME_AUTO = ("use_liger", "max_time", "lr_decay_seconds")


def resume_args(args, ckpt: Path):
    """The settings of a resumed run: the run's saved args.json, with the explicitly given flags that
    are safe to change on top. An unsafe change is refused rather than silently ignored.
    Returns (settings, the one line that says where they came from)."""
    import dataclasses

    from ocrtune.args import given_flags
    from ocrtune.fileio import read_json
    from ocrtune.train.args import validate

    path = Path(ckpt).parent / "args.json"
    if not path.exists():
        return args, f"resuming from {ckpt}: its run has no args.json, so the flags given now are used"
    saved = read_json(path)
    fields = {f.name for f in dataclasses.fields(args)}
    given = given_flags(args) & fields
    unsafe = [k for k in sorted(given - RESUME_SAFE) if k in saved and _differs(getattr(args, k), saved[k])]
    if unsafe:
        shown = ", ".join(f"--{k} {_show(getattr(args, k))} (run: {_show(saved[k])})" for k in unsafe)
        raise UserError(f"resuming {ckpt} with changed {shown}; a resumed run keeps the settings that decide its "
                        "updates (model, data, learning rate, schedule, steps, batch sizes)",
                        "drop those flags to continue the run as it was, or start a new run without --resume_from_checkpoint")
    values = {k: saved[k] for k in fields if k in saved}
    values.update({k: None for k in RESUME_AUTO if k not in given})
    overrides = {k: getattr(args, k) for k in given if k in RESUME_SAFE or k not in saved}
    values.update(overrides)
    merged = type(args)(**values)
    validate(merged)
    check_unchanged(path.parent, (merged.dataset or []) + (merged.val_dataset or []), merged.allow_data_change)
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    # only what really differs from the run (a flag given with the run's own value changes nothing)
    shown = [f"--{k} {_show(v)}" for k, v in sorted(overrides.items())
             if k != "resume_from_checkpoint" and _differs(v, saved.get(k, defaults.get(k)))]
    return merged, f"resuming from {ckpt} with the run's settings from {path}" + (f"; changed: {', '.join(shown)}" if shown else "")


def load_adapter(model, adapter: dict, ckpt: Path, lora_rank: int) -> None:
    """Put a checkpoint's LoRA weights into the run's PEFT model; an adapter of another shape (e.g. another
    --lora_rank than the run now asks for) is a one-line error naming the mismatch."""
    from peft import set_peft_model_state_dict

    from ocrtune.errors import first_line
    from ocrtune.fileio import read_json
    try:
        set_peft_model_state_dict(model, adapter)
    except RuntimeError as e:
        config = Path(ckpt) / "adapter_config.json"
        saved_rank = read_json(config).get("r") if config.exists() else None
        detail = (f"it has LoRA rank {saved_rank} and this run --lora_rank {lora_rank}" if saved_rank not in (None, lora_rank)
                  else _first_mismatch(str(e)) or first_line(e))
        raise UserError(f"the adapter in {ckpt} does not fit this run's LoRA shape: {detail}",
                        "resume with the run's own LoRA flags" + (f" (--lora_rank {saved_rank})" if saved_rank else "")
                        + ", or start a new run without --resume_from_checkpoint") from None


def _first_mismatch(message: str) -> str | None:
    import re
    m = re.search(r"size mismatch for ([^:]+): copying a param with shape (\S+) from checkpoint, "
                  r"the shape in current model is (\S+?)\.?$", message, re.M)
    return f"{m.group(1)} is {m.group(2)} in the checkpoint and {m.group(3)} in the model" if m else None


def _differs(given, saved) -> bool:
    if isinstance(given, (int, float)) and isinstance(saved, (int, float)) and not isinstance(given, bool):
        return float(given) != float(saved)
    return given != saved


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)
