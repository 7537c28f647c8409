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

from ocrtune.compat import quiet_peft_deprecations
from ocrtune.errors import UserError
from ocrtune.fileio import replace_dir, temp_dir_for
from ocrtune.checkpoint import (Source, base_model, describe, file_sha256, is_merged, load_base_overlay, merged_dir_for,  # noqa: F401
                                read_merge_info, write_merge_info)

log = logging.getLogger("ocrtune")


_is_merged = is_merged  # moved to ocrtune.checkpoint (issue 14), like merged_dir_for


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
    adapter_sha = file_sha256(src.path / "adapter_model.safetensors")
    if out.exists() and not force:
        if _is_merged(out):
            info = read_merge_info(out)
            if info.get("adapter_sha256") != adapter_sha:  # e.g. the run was resumed and re-saved this step
                raise UserError(f"{out} was merged from a different adapter than {src.path} now holds",
                                "pass --force true to merge again, or --output_dir for a new folder")
            return out
        raise UserError(f"{out} already exists and is not a merged checkpoint",
                        "pass --force true to replace it, or choose another --output_dir")
    if out.resolve() == src.path.resolve() or src.path.resolve() in out.resolve().parents:
        raise UserError(f"--output_dir {out} is inside the checkpoint {src.path}", "write the merged model elsewhere")
    return _merge(src, out, adapter_sha, dtype, model, model_type, use_hf)


def _merge(src: Source, out: Path, adapter_sha: str, dtype: str, model, model_type, use_hf) -> Path:
    import torch
    from peft import PeftModel

    from ocrtune.models.dtypes import dtype_for, pick_device
    from ocrtune.models.loading import load_model, load_processor
    from ocrtune.models.template import Template

    base_dir, spec = base_model(src, model, model_type, use_hf)
    bits = src.run_args.get("quant_bits")
    if bits and dtype in (None, "auto"):
        dtype = "bfloat16"  # a QLoRA adapter trained against bf16 compute
    torch_dtype = dtype_for(dtype, "merge", model_dir=base_dir)  # auto: the base model's stored dtype
    if bits:  # the base is loaded unquantized below: folding into dequantized 4-bit weights would bake their error in
        print(f"merging a QLoRA adapter (trained over a {bits}-bit base) into the unquantized weights of {base_dir} in "
              f"{str(torch_dtype).replace('torch.', '')}", file=sys.stderr)
    device = pick_device()
    base = load_model(base_dir, torch_dtype, device=device)
    load_base_overlay(base, src.path)  # a --relora_steps checkpoint's folded base weights
    try:
        with quiet_peft_deprecations():
            peft_model = PeftModel.from_pretrained(base, str(src.path), is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"the adapter in {src.path} does not fit the base model {base_dir}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                        "pass the base model it was trained on with --model") from None
    merged = peft_model.merge_and_unload()
    merged.config.use_cache = True  # training turns the KV cache off; a shipped model wants it on
    processor = load_processor(base_dir)
    ra = src.run_args
    # the image size bounds the run trained with travel with the processor
    Template(processor, ra.get("template") or "qwen2_vl").set_pixels(ra.get("max_pixels"), ra.get("min_pixels"))

    with temp_dir_for(out) as tmp:
        _write_merged(merged, processor, src, out, tmp, base_dir, torch_dtype, adapter_sha)
    del base, peft_model, merged
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
        if _is_merged(out):  # another process finished the same merge first: use its folder
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
