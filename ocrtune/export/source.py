"""What a `--ckpt_dir` is, and which base model and run settings go with it.

A `--ckpt_dir` is one of:

* a LoRA checkpoint from `ocrtune sft` (`adapter_config.json`; the run's `args.json` is one level up),
* a model folder (`config.json` + weights): a full fine-tuning checkpoint, a `checkpoint-N-merged/`
  folder written by `ocrtune export`, or any `save_pretrained` folder,
* a run folder (`args.json` + `checkpoint-*/`): its newest checkpoint is used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ocrtune.errors import UserError
from ocrtune.fileio import read_json  # noqa: F401  (moved; issue 14)

log = logging.getLogger("ocrtune")

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
    from ocrtune.train.checkpoint import check_safetensors, check_weights
    path = Path(ckpt_dir).expanduser()
    if not path.exists():
        raise UserError(f"--ckpt_dir {ckpt_dir} does not exist", "pass a checkpoint-N folder written by ocrtune sft")
    if not path.is_dir():
        raise UserError(f"--ckpt_dir {ckpt_dir} is a file, not a folder", "pass the checkpoint-N folder that holds it")
    if not (path / "adapter_config.json").exists() and not (path / "config.json").exists() and (path / RUN_ARGS).exists():
        from ocrtune.train.checkpoint import list_checkpoints
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


def _spec_or_none(name: str | None):
    from ocrtune.models.registry import find_model
    return find_model(name) if name else None


def base_model(src: Source, model: str | None = None, model_type: str | None = None,
               use_hf: bool | None = None):
    """(folder, registry spec or None) of the base model a LoRA checkpoint was trained on.

    `--model`/`--model_type` given by the user win; then the run's `model_dir` (if it is still there);
    then the run's `--model`/`--model_type` resolved again (presets are rebuilt, hub models re-downloaded);
    then the adapter's `base_model_name_or_path`."""
    from ocrtune.models.loading import resolve_model
    ra = src.run_args
    hf = ra.get("use_hf", True) if use_hf is None else use_hf
    if model or model_type:
        return resolve_model(model, model_type, hf)
    model_dir = ra.get("model_dir")
    if model_dir and (Path(model_dir) / "config.json").exists():
        return Path(model_dir), _spec_or_none(ra.get("model_type"))
    if ra.get("model") or ra.get("model_type"):
        return resolve_model(ra.get("model"), ra.get("model_type"), hf)
    if src.kind == "lora":
        base = read_json(src.path / "adapter_config.json").get("base_model_name_or_path")
        if base and (Path(base) / "config.json").exists():
            return Path(base), None
        if base and not base.startswith((".", "/", "~")):
            return resolve_model(base, None, hf)
    raise UserError(f"can't tell which base model the adapter in {src.path} belongs to (no run args.json next to it)",
                    "pass the base model with --model")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
