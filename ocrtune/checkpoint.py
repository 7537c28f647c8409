"""The checkpoint format, in one place: what the folders of a run hold, how they are written and read.

* Writing (`ocrtune sft`): `save_checkpoint` builds `checkpoint-<step>/` in a temporary folder and renames
  it into place, so a kill mid-save leaves the previous checkpoint intact. Each holds the adapter (or full
  weights) as safetensors plus optimizer/scheduler/RNG/trainer state for an exact resume
  (`read_resume_state`, `apply_states`); `rotate_checkpoints` keeps `--save_total_limit` of them.
* Resolving: `find_resume_checkpoint` (`--resume_from_checkpoint`: a folder, a run folder or `last`),
  `describe` (`--ckpt_dir`). Which base model a LoRA checkpoint loads (and downloading it) is
  `ocrtune.models.source`; loading base + adapter is `ocrtune.export.source.load_adapted`.
* Kinds: a LoRA checkpoint (`adapter_config.json`; the run's `args.json` one level up), a model folder
  (`config.json` + weights: a full fine-tuning checkpoint, a `checkpoint-N-merged/` folder written by
  `ocrtune export`, or any `save_pretrained` folder), a run folder (`args.json` + `checkpoint-*/`: its
  newest checkpoint is used).
* Merge info: `ocrtune_merge.json` in a merged folder (`write_merge_info`, `read_merge_info`, `is_merged`)
  records its source adapter and carries the run settings inference needs.
* Base overlay: a LoRA checkpoint of a `--relora_steps` run also holds `relora_base.safetensors`, the base
  weights its adapters sit on (earlier adapters folded in); `load_base_overlay` puts them into the base model
  before the adapter is attached (resume, inference, merge).
* Older layouts: a full checkpoint saved without its processor loads the processor from its base model.

What a training run does with a checkpoint (which flags a resume may change) is `ocrtune.train.resume`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ocrtune.errors import UserError, first_line
from ocrtune.fileio import MAX_JSON_BYTES, UnsafeFile, check_regular, read_bounded, read_json, replace_dir


STATE_FILE = "trainer_state.json"
BASE_OVERLAY = "relora_base.safetensors"  # a --relora_steps checkpoint's base weights (the folded adapters)
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


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, trainer_state: dict, processor=None,
                    base_overlay: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically; returns its path. base_overlay: {name: tensor} of base weights
    written beside a LoRA adapter (BASE_OVERLAY)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    final = Path(run_dir) / f"checkpoint-{step}"
    tmp = Path(run_dir) / f".checkpoint-{step}.tmp"
    try:
        remove_interrupted_saves(run_dir)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        if base_overlay is not None:
            save_file({k: v.detach().contiguous().cpu() for k, v in base_overlay.items()}, tmp / BASE_OVERLAY)
        if processor is not None and not hasattr(model, "peft_config"):
            processor.save_pretrained(tmp)  # full fine-tuning: the folder is a loadable model
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng_state.pt")
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(trainer_state, f, indent=2)
        _fsync_dir(tmp)
        replace_dir(tmp, final)  # re-saving a step (e.g. after a resume) swaps the old folder out
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save's writer fails with a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) and not _is_write_failure(e):
            raise
        if _is_disk_full(e, run_dir):
            raise UserError(f"disk full while saving checkpoint-{step}; the previous checkpoint is intact",
                            f"free disk space in {run_dir} or lower --save_total_limit, "
                            "then resume with --resume_from_checkpoint last") from None
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        raise UserError(f"could not save checkpoint-{step} in {run_dir}: {reason}",
                        "check that the output folder is writable, then resume with --resume_from_checkpoint last") from None
    return final


# how the writers report a failed write: safetensors wraps the io::Error in its message, torch.save names its writer
_WRITE_FAILURE = ("IoError", "Error while serializing", "PytorchStreamWriter failed", "file write failed")
FULL_BELOW = 64 << 20  # free bytes under which a failed write is taken for a full disk
_DISK_FULL = ("No space left", "StorageFull", "code: 28", "Disk quota exceeded", "QuotaExceeded", "code: 122")


def _is_write_failure(e: BaseException) -> bool:
    return any(m in str(e) for m in _WRITE_FAILURE)


def _is_disk_full(e: BaseException, run_dir: Path) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if any(m in str(e) for m in _DISK_FULL):
        return True
    try:  # torch.save's "file write failed" does not say why: the free space left does
        return shutil.disk_usage(run_dir).free < FULL_BELOW
    except OSError:
        return False


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
        check_regular(path)  # a FIFO or device in its place would block or never end
        with safe_open(str(path), "pt") as f:
            f.keys()
    except (SafetensorError, OSError, UnsafeFile) as e:
        raise corrupt(path, first_line(e)) from None


def check_weights(folder: Path) -> None:
    """Every *.safetensors of a checkpoint or model folder is whole."""
    for f in sorted(Path(folder).glob("*.safetensors")):
        check_safetensors(f)


def load_trainer_state(ckpt: Path) -> dict:
    path = Path(ckpt) / STATE_FILE
    try:
        state = json.loads(read_bounded(path, MAX_JSON_BYTES, "trainer state"))
    except (json.JSONDecodeError, UnicodeDecodeError, UnsafeFile) as e:
        raise corrupt(path, first_line(e)) from None
    missing = [k for k in ("global_step", "epoch", "micro_batches_done") if not isinstance(state, dict) or k not in state]
    if missing:
        raise corrupt(path, f"no {', '.join(missing)}")
    return state


def _torch_load(path: Path):
    try:
        check_regular(path)
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
        if (ckpt / BASE_OVERLAY).exists():
            check_safetensors(ckpt / BASE_OVERLAY)
            state["base_overlay"] = load_file(ckpt / BASE_OVERLAY)
    else:
        if not any(ckpt.glob("*.safetensors")):
            raise corrupt(ckpt / "model.safetensors", "missing")
        check_weights(ckpt)
    names = ("optimizer.pt", "scheduler.pt", "rng_state.pt") if optimizer else ("scheduler.pt", "rng_state.pt")
    state.update({name: _torch_load(ckpt / name) for name in names})
    return state


def load_base_overlay(model, folder: Path, overlay: dict | None = None) -> int:
    """Put a LoRA checkpoint's base overlay (BASE_OVERLAY, or `overlay` already read) into the base model
    `model` (not PEFT-wrapped) before its adapter is attached; returns the number of tensors (0: none)."""
    from safetensors.torch import load_file
    path = Path(folder) / BASE_OVERLAY
    if overlay is None:
        if not path.exists():
            return 0
        check_safetensors(path)
        overlay = load_file(path)
    params = dict(model.named_parameters())
    missing = [k for k in overlay if k not in params or params[k].shape != overlay[k].shape]
    if missing:
        raise UserError(f"{path} does not fit the base model: {len(missing)} of its tensors have no parameter of that "
                        f"name and shape (first: {missing[0]})", "pass the base model the run was trained on with --model")
    with torch.no_grad():
        for k, v in overlay.items():
            params[k].copy_(v.to(params[k].dtype))
    return len(overlay)


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


# ---------------------------------------------------------------- `--ckpt_dir`: kinds and run settings

RUN_ARGS = "args.json"
MERGE_INFO = "ocrtune_merge.json"
# run settings that inference needs (copied into a merged folder so it works away from its run)
INFER_KEYS = ("model", "model_type", "model_dir", "template", "system", "max_pixels", "min_pixels", "max_length",
              "dataset", "val_dataset", "dataset_test_ratio", "check_dataset_strategy", "seed", "use_hf", "train_type")


@dataclass
class Source:
    path: Path  # the checkpoint or model folder
    kind: str  # "lora" (adapter folder) or "model" (config.json + weights)
    run_args: dict = field(default_factory=dict)  # the training run's args.json ({} when there is none)

    @property
    def run_dir(self) -> Path | None:
        return self.path.parent if (self.path.parent / RUN_ARGS).exists() else None


def run_args_for(path: Path) -> dict:
    """The run settings for a checkpoint folder: a merged folder's own copy first, else ../args.json."""
    info = path / MERGE_INFO
    if info.exists():
        saved = read_json(info).get("run_args") or {}
        if saved:
            return saved
    if (path.parent / RUN_ARGS).exists():
        return read_json(path.parent / RUN_ARGS)
    return {}


def describe(ckpt_dir: str | Path) -> Source:
    """Classify `--ckpt_dir`, check that its weight files are whole, and read its run settings."""
    path = Path(ckpt_dir).expanduser()
    if not path.exists():
        raise UserError(f"--ckpt_dir {ckpt_dir} does not exist", "pass a checkpoint-N folder written by ocrtune sft")
    if not path.is_dir():
        raise UserError(f"--ckpt_dir {ckpt_dir} is a file, not a folder", "pass the checkpoint-N folder that holds it")
    if not (path / "adapter_config.json").exists() and not (path / "config.json").exists() and (path / RUN_ARGS).exists():
        ckpts = list_checkpoints(path)
        if not ckpts:
            raise UserError(f"run folder {path} has no checkpoints yet", "train longer, or pass a checkpoint-N folder")
        print(f"using {ckpts[-1].name}, the newest checkpoint of run {path}", file=sys.stderr)
        path = ckpts[-1]
    if (path / "adapter_config.json").exists():
        if not (path / "adapter_model.safetensors").exists():
            raise UserError(f"LoRA checkpoint {path} has no adapter_model.safetensors",
                            "the checkpoint is incomplete; use another checkpoint-N folder of the run")
        check_safetensors(path / "adapter_model.safetensors")
        return Source(path, "lora", run_args_for(path))
    if (path / "config.json").exists():
        if not any(path.glob("*.safetensors")):
            raise UserError(f"model folder {path} has config.json but no *.safetensors weights",
                            "the folder is incomplete; export or save it again")
        check_weights(path)
        return Source(path, "model", run_args_for(path))
    raise UserError(f"{path} is neither a LoRA checkpoint (adapter_config.json) nor a model folder (config.json)",
                    "pass a checkpoint-N folder written by ocrtune sft, or a merged checkpoint-N-merged folder")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        check_regular(path, what="checkpoint file")  # a FIFO would block the read, a device never end it
    except UnsafeFile as e:
        raise corrupt(path, str(e)) from None
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- merged folders (`ocrtune export`)

def merged_dir_for(ckpt: Path) -> Path:
    return ckpt.parent / f"{ckpt.name}-merged"


def is_merged(out: Path) -> bool:
    return (out / MERGE_INFO).exists() and (out / "config.json").exists() and any(out.glob("*.safetensors"))


def write_merge_info(folder: Path, src: Source, base_dir, torch_dtype, adapter_sha: str) -> None:
    """`ocrtune_merge.json`: where a merged folder came from, and the run settings inference needs."""
    ra = src.run_args
    info = {"source_checkpoint": str(src.path.resolve()), "base_model": str(base_dir), "dtype": str(torch_dtype),
            "adapter_sha256": adapter_sha, "run_args": {k: ra[k] for k in INFER_KEYS if k in ra}}
    (folder / MERGE_INFO).write_text(json.dumps(info, indent=2))


def read_merge_info(folder: Path) -> dict:
    return read_json(folder / MERGE_INFO)
