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

from ocrtune.errors import UserError
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
        if tmp.exists():
            shutil.rmtree(tmp)
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


def _fsync_dir(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def load_trainer_state(ckpt: Path) -> dict:
    with open(Path(ckpt) / STATE_FILE) as f:
        return json.load(f)


def load_states(ckpt: Path, optimizer, scheduler) -> None:
    optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(ckpt / "rng_state.pt", weights_only=True))


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
