"""`ocrtune export --merge_lora true`: fold a LoRA adapter into its base weights.

The result, `checkpoint-N-merged/` next to the checkpoint, is a standalone model folder (safetensors
weights, config, generation config, tokenizer, processor, chat template) that plain
`transformers.AutoModelForImageTextToText.from_pretrained` + `AutoProcessor.from_pretrained` load
without ocrtune. It is written to a temporary folder and renamed into place, so an interrupted merge
leaves nothing half-written; an existing merged folder is reused unless `force`.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

from ocrtune.checkpoint import Source, describe, file_sha256, is_merged, merged_dir_for, read_merge_info, write_merge_info
from ocrtune.errors import UserError
from ocrtune.export.source import load_adapted
from ocrtune.fileio import check_not_input, replace_dir, temp_dir_for
from ocrtune.models.source import base_model

log = logging.getLogger("ocrtune")


def merge_lora(ckpt_dir: str | Path, output_dir: str | Path | None = None, force: bool = False, dtype: str = "auto",
               model: str | None = None, model_type: str | None = None, use_hf: bool | None = None) -> Path:
    """Merge the LoRA checkpoint `ckpt_dir` into its base model; returns the merged folder.

    dtype: "auto" keeps the base model's stored dtype; or bfloat16/float16/float32.
    model/model_type override the base model recorded in the run's args.json."""
    src = describe(ckpt_dir)
    if src.kind != "lora":
        raise UserError(f"{src.path} is already a full model folder, not a LoRA checkpoint; there is nothing to merge",
                        f"use it directly: ocrtune infer --ckpt_dir {src.path}")
    out = Path(output_dir).expanduser() if output_dir else merged_dir_for(src.path)
    check_output_dir(out, src)
    adapter_sha = file_sha256(src.path / "adapter_model.safetensors")
    if out.exists() and is_merged(out) and not force:
        info = read_merge_info(out)
        if info.get("adapter_sha256") != adapter_sha:  # e.g. the run was resumed and re-saved this step
            raise UserError(f"{out} was merged from a different adapter than {src.path} now holds",
                            "pass --force true to merge again, or --output_dir for a new folder")
        return out
    return _merge(src, out, adapter_sha, dtype, model, model_type, use_hf)


RUN_MARKERS = ("args.json", "logging.jsonl", "trainer_state.json", "adapter_config.json")


def _holds_run(folder: Path) -> Path | None:
    """A file under `folder` that marks a training run or a checkpoint (the first one found), else None."""
    for root, dirs, files in os.walk(folder):
        hit = next((f for f in files if f in RUN_MARKERS), None)
        if hit:
            return Path(root) / hit
    return None


def _is_checkpoint(folder: Path) -> bool:
    """A checkpoint of a run, or a model folder (config.json beside safetensors weights)."""
    return any((folder / m).exists() for m in ("trainer_state.json", "adapter_config.json")) or \
        ((folder / "config.json").exists() and any(folder.glob("*.safetensors")))


def check_output_dir(out: Path, src: Source) -> None:
    """Where an export may write: a new folder, an empty one, or an earlier export (its MERGE_INFO marker,
    no subfolders), replaced only with --force. Never the checkpoint, a run, a folder holding either, or a
    folder inside a checkpoint or model; a new folder directly in the run (the default place) is fine."""
    check_not_input("--output_dir", out, [("the checkpoint", src.path)], contains=True)
    if src.run_dir is not None:  # the default checkpoint-N-merged lies in the run: only "is" and "contains" count
        check_not_input("--output_dir", out, [("the run folder", src.run_dir)], contains=True, inside=False)
    real = out.expanduser().resolve()
    for parent in real.parents:
        if _is_checkpoint(parent):
            raise UserError(f"--output_dir {out} lies inside the checkpoint or model folder {parent}",
                            "write the merged model elsewhere")
        if parent != real.parent and (parent / "args.json").exists() and (parent / "logging.jsonl").exists():
            raise UserError(f"--output_dir {out} lies inside the training run {parent}",
                            "write the merged model next to the checkpoints (the default) or outside the run")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--output_dir {out} is a file", "choose a new folder for the merged model")
    if is_merged(out) and not any(p.is_dir() for p in out.iterdir()):
        return  # an earlier export: reused, or replaced with --force
    if not any(out.iterdir()):
        return
    run = _holds_run(out)
    what = f"holds a training run or checkpoint ({run})" if run else "is not a merged checkpoint written by ocrtune export"
    raise UserError(f"{out} already exists and {what}",
                    "choose a new or empty --output_dir; --force true only replaces an earlier export")


def _merge(src: Source, out: Path, adapter_sha: str, dtype: str, model, model_type, use_hf) -> Path:
    import torch

    from ocrtune.models.dtypes import dtype_for, pick_device
    from ocrtune.models.loading import load_processor
    from ocrtune.models.template import Template

    base_dir, spec = base_model(src, model, model_type, use_hf)
    bits = src.run_args.get("quant_bits")
    if bits and dtype in (None, "auto"):
        dtype = "bfloat16"  # a QLoRA adapter trained against bf16 compute
    check_not_input("--output_dir", out, [("the base model", base_dir)], contains=True)
    torch_dtype = dtype_for(dtype, "merge", model_dir=base_dir)  # auto: the base model's stored dtype
    if bits:  # the base is loaded unquantized below: folding into dequantized 4-bit weights would bake their error in
        print(f"merging a QLoRA adapter (trained over a {bits}-bit base) into the unquantized weights of {base_dir} in "
              f"{str(torch_dtype).replace('torch.', '')}", file=sys.stderr)
    device = pick_device()
    peft_model = load_adapted(base_dir, src.path, torch_dtype, device, command="export")
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True  # training turns the KV cache off; a shipped model wants it on
    ra = src.run_args
    # the image size bounds the run trained with travel with the processor
    template = Template(load_processor(base_dir), ra.get("template") or "qwen2_vl")
    template.set_pixels(ra.get("max_pixels"), ra.get("min_pixels"))
    processor = template.processor

    with temp_dir_for(out) as tmp:
        _write_merged(merged, processor, src, out, tmp, base_dir, torch_dtype, adapter_sha)
    del peft_model, merged
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _write_merged(merged, processor, src: Source, out: Path, tmp: Path, base_dir, torch_dtype, adapter_sha: str) -> Path:
    try:
        os.chmod(tmp, 0o755)
        merged.save_pretrained(tmp)  # safetensors, config.json, generation_config.json
        processor.save_pretrained(tmp)  # tokenizer, image processor, chat template
        write_merge_info(tmp, src, base_dir, torch_dtype, adapter_sha)
        for f in tmp.iterdir():  # some writers create 0600 files; a shipped model is world-readable
            os.chmod(f, 0o644)
        if not any(tmp.glob("*.safetensors")):
            raise UserError(f"merging wrote no safetensors weights in {tmp}", "report this as a bug")
        replace_dir(tmp, out)  # with --force, the old folder is swapped out only once the new one is whole
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_merged(out):  # another process finished the same merge first: use its folder
            return out
        raise UserError(f"could not write the merged model to {out}: {e.strerror or e}",
                        "check free disk space and that the folder is writable, or pass --output_dir") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run_export(args) -> Path:
    """`ocrtune export`: merge and print the merged folder's path."""
    if not args.ckpt_dir:
        raise UserError("ocrtune export needs --ckpt_dir", "pass the LoRA checkpoint folder, e.g. --ckpt_dir output/.../checkpoint-100")
    if not args.merge_lora:
        raise UserError("ocrtune export only merges LoRA checkpoints for now", "pass --merge_lora true")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    out = merge_lora(args.ckpt_dir, args.output_dir, args.force, args.dtype)
    print(out)
    return out
