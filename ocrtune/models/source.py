"""Which model folders a checkpoint loads: the base model a LoRA adapter was trained on (resolved, and for
hub models downloaded, by `ocrtune.models.loading.resolve_model`), and the processor folder. A checkpoint
(`src`) is what `ocrtune.checkpoint.describe` returns: its `path`, `kind` ("lora" or "model") and the run's
`run_args`."""
from __future__ import annotations

import logging
from pathlib import Path

from ocrtune.errors import UserError
from ocrtune.fileio import read_json
from ocrtune.models.loading import resolve_model
from ocrtune.models.registry import find_model

log = logging.getLogger("ocrtune")


def _spec_or_none(name: str | None):
    return find_model(name) if name else None


def base_model(src, model: str | None = None, model_type: str | None = None, use_hf: bool | None = None):
    """(folder, registry spec or None) of the base model a LoRA checkpoint was trained on.

    `--model`/`--model_type` given by the user win; then the run's `model_dir` (if it is still there);
    then the run's `--model`/`--model_type` resolved again (presets are rebuilt, hub models re-downloaded);
    then the adapter's `base_model_name_or_path`."""
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


def resolve_source(src, model: str | None = None, model_type: str | None = None):
    """(weights folder, registry spec or None, processor folder, adapter folder or None) to load for `src`.
    A LoRA checkpoint loads its base model (`base_model`) plus the adapter; a model folder loads itself
    (`--model`/`--model_type` are ignored, with a warning), except that an older full checkpoint saved
    without its processor takes the processor from its base model."""
    adapter = None
    run_args = src.run_args
    if src.kind == "lora":
        weights_dir, spec = base_model(src, model, model_type)
        processor_dir, adapter = weights_dir, src.path
    else:
        if model or model_type:
            log.warning("--model/--model_type are ignored: %s is a full model folder", src.path)
        weights_dir, spec, processor_dir = src.path, None, src.path
        if not any((src.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")) and run_args:
            processor_dir = base_model(src)[0]  # an older full checkpoint saved without its processor
    return weights_dir, spec, processor_dir, adapter
