"""Checkpoints: written to a temporary folder and renamed into place, so a kill mid-save leaves the
previous checkpoint intact. Each holds the adapter (or full weights) as safetensors plus
optimizer/scheduler/RNG/trainer state for an exact resume."""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import torch

from ocrtune.errors import UserError, first_line
from ocrtune.fileio import replace_dir

STATE_FILE = "trainer_state.json"
CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are ignored)."""
    found = [p for p in Path(run_dir).glob("checkpoint-*") if CKPT_RE.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(i) for i in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict, processor=None) -> Path:
    """Write checkpoint-<step> atomically; returns its path."""
    final = Path(run_dir) / f"checkpoint-{step}"
    tmp = Path(run_dir) / f".checkpoint-{step}.tmp"
    try:
        remove_interrupted_saves(run_dir)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if os.environ.get("OCRTUNE_FAULT_SLOW_SAVE"):  # fault injection for the kill-during-save test
            import time
            time.sleep(float(os.environ["OCRTUNE_FAULT_SLOW_SAVE"]))
        if processor is not None and not hasattr(model, "peft_config"):
            processor.save_pretrained(tmp)  # full fine-tuning: the folder is a loadable model
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=2)
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) swaps the old folder out
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise UserError(f"disk full while saving checkpoint-{step} in {run_dir}; the previous checkpoint is intact",
                            "free disk space or lower --save_total_limit, then resume with --resume_from_checkpoint last") from None
        raise UserError(f"could not save checkpoint-{step} in {run_dir}: {e.strerror}",
                        "check that the output folder is writable, then resume with --resume_from_checkpoint last") from None
    return final


def remove_interrupted_saves(run_dir: Path) -> None:
    """Temporary folders of saves that were killed (any step: the resumed run may never save that
    step again). Only rank 0 saves, one at a time, so none of them is being written."""
    for p in Path(run_dir).glob(".checkpoint-*"):
        # a `.old` is kept while its checkpoint is missing: a kill mid-swap left the previous one there
        stale = p.name.endswith(".tmp") or (p.name.endswith(".old") and (p.parent / p.name[1:-4]).exists())
        if p.is_dir() and stale:
            shutil.rmtree(p, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def corrupt(path: Path, reason: str) -> UserError:
    """The one-line error for a damaged file of a checkpoint, with the checkpoint to fall back on."""
    ckpt = Path(path).parent
    m = CKPT_RE.match(ckpt.name)
    older = [p for p in list_checkpoints(ckpt.parent) if m and int(CKPT_RE.match(p.name).group(1)) < int(m.group(1))]
    fix = (f"use the previous checkpoint {older[-1]} instead (delete {ckpt.name} first when resuming with 'last')"
           if older else f"delete {ckpt} and use another checkpoint; if it was the run's only one, start the run again")
    return UserError(f"checkpoint file {path} is damaged ({reason})", fix)


def check_safetensors(path: Path) -> None:
    """Read the header, which also checks that the file is as long as it says (a truncated or
    garbage file fails here, in milliseconds, instead of deep inside a load)."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError) as e:
        raise corrupt(path, first_line(e)) from None


def check_weights(folder: Path) -> None:
    """Every *.safetensors of a checkpoint or model folder is whole."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(f)


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    try:
        with open(path) as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt(path, first_line(e)) from None
    missing = [k for k in ("global_step", "epoch", "micro_batches_done") if not isinstance(state, dict) or k not in state]
    if missing:
        raise corrupt(path, f"no {', '.join(missing)}")
    return state


def _torch_load(path: Path):
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise corrupt(path, "missing") from None
    except Exception as e:  # truncated zip, garbage, wrong pickle: torch raises several kinds
        raise corrupt(path, first_line(e)) from None


def read_resume_state(ckpt: Path, train_type: str, optimizer: bool = True) -> dict:
    """Every file of a checkpoint, read and checked before the run builds or writes anything, so a
    damaged one stops the resume with its name and changes nothing: trainer state, the adapter (LoRA)
    or the weights' headers (full: loaded later by from_pretrained), optimizer, scheduler, RNG.
    optimizer=False leaves optimizer.pt to another rank (sharded runs: rank 0 reads it and broadcasts)."""
    from safetensors.torch import load_file
    ckpt = Path(ckpt)
    state = {"trainer_state": load_trainer_state(ckpt)}
    if train_type == "lora":
        check_safetensors(ckpt / "adapter_model.safetensors")
        state["adapter"] = load_file(ckpt / "adapter_model.safetensors")
    else:
        if not any(ckpt.glob("*.safetensors")):
            raise corrupt(ckpt / "model.safetensors", "missing")
        check_weights(ckpt)
    names = ("optimizer.pt", "scheduler.pt", "rng_state.pt") if optimizer else ("scheduler.pt", "rng_state.pt")
    state.update({name: _torch_load(ckpt / name) for name in names})
    return state


def apply_states(ckpt: Path, states: dict, optimizer, scheduler) -> None:
    """Optimizer, scheduler and RNG state read by `read_resume_state`."""
    for name, apply in (("optimizer.pt", optimizer.load_state_dict), ("scheduler.pt", scheduler.load_state_dict),
                        ("rng_state.pt", set_rng_state)):
        if name not in states:  # taken by the caller (sharded optimizer state, loaded after set-up)
            continue
        try:
            apply(states[name])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise corrupt(ckpt / name, f"does not fit this run: {first_line(e)}") from None


def rotate_checkpoints(run_dir: Path, limit: int | None, best: Path | None) -> None:
    """Keep at most `limit` checkpoints, never removing the best or the newest."""
    if not limit or limit <= 0:
        return
    ckpts = list_checkpoints(run_dir)
    keep = {ckpts[-1]} if ckpts else set()
    if best is not None:
        keep.add(Path(best))
    for p in reversed(ckpts):
        if len(keep) >= limit:
            break
        keep.add(p)
    for p in ckpts:
        if p not in keep:
            shutil.rmtree(p, ignore_errors=True)


def find_resume_checkpoint(value: str, output_dir: Path) -> Path:
    """--resume_from_checkpoint: a checkpoint folder, a run folder, or 'last'."""
    if value == "last":
        runs = sorted((p.parent for p in Path(output_dir).glob("**/args.json")), key=lambda p: p.stat().st_mtime)
        for run in reversed(runs):
            ckpts = list_checkpoints(run)
            if ckpts:
                return ckpts[-1]
        raise UserError(f"no checkpoint to resume from under {output_dir}",
                        "start a new run (drop --resume_from_checkpoint) or pass a checkpoint folder")
    p = Path(value)
    if p.is_dir() and (p / STATE_FILE).exists():
        return p
    if p.is_dir() and list_checkpoints(p):
        return list_checkpoints(p)[-1]
    raise UserError(f"--resume_from_checkpoint {value} is not a checkpoint folder",
                    "pass a checkpoint-<step> folder written by ocrtune sft, its run folder, or 'last'")


# Flags a resumed run may change: they decide what is logged, evaluated, kept and where, or how fast
# the same math runs. Everything else (model, data, lr, schedule, steps, batch sizes, seed, LoRA
# shape...) decides which updates the run makes, so it comes from the run's args.json.
RESUME_SAFE = frozenset({
    "resume_from_checkpoint", "output_dir", "logging_steps", "eval_steps", "save_steps", "save_total_limit",
    "report_to", "predict_with_generate", "max_new_tokens", "eval_batch_size", "dataloader_num_workers",
    "use_liger", "attn_impl", "fused_lora", "recompute_layers", "loss_chunk_size", "gradient_checkpointing",
})
RESUME_AUTO = ("use_liger",)  # resolved per machine ("auto"), not taken from the saved run


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
    shown = [f"--{k} {_show(v)}" for k, v in sorted(overrides.items()) if k != "resume_from_checkpoint"]
    return merged, f"resuming from {ckpt} with the run's settings from {path}" + (f"; changed: {', '.join(shown)}" if shown else "")


def _differs(given, saved) -> bool:
    if isinstance(given, (int, float)) and isinstance(saved, (int, float)) and not isinstance(given, bool):
        return float(given) != float(saved)
    return given != saved


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, list) else str(v)
