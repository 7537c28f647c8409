"""Loading for `ocrtune infer`, `ocrtune eval` and `ocrtune serve`: `--ckpt_dir` (a LoRA checkpoint, a merged or
full model folder, or a run folder; resolved by `ocrtune.checkpoint`) or `--model` alone -> an `InferEngine`."""
from __future__ import annotations

import logging
import sys

from ocrtune.errors import UserError
from ocrtune.infer.args import InferArgs

log = logging.getLogger("ocrtune")


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def load_for_inference(args: InferArgs):
    """Build the engine for `--ckpt_dir` (LoRA checkpoint, merged/full model folder or run folder) or
    `--model` alone. Returns (InferEngine, info) where info tells what was loaded and the run's settings."""
    from ocrtune.checkpoint import describe, resolve_source
    from ocrtune.infer.engine import InferEngine, pick_device, pick_dtype
    from ocrtune.models.loading import check_new_tokens, load_model, load_processor, resolve_model, template_name
    from ocrtune.models.template import Template

    device = pick_device()
    dtype = pick_dtype(args.dtype, device)
    adapter = None
    if args.ckpt_dir:
        src = describe(args.ckpt_dir)
        if src.kind == "lora" and args.merge_lora:
            from ocrtune.export.merge import merge_lora
            merged = merge_lora(src.path, force=args.force, model=args.model, model_type=args.model_type)
            print(f"merged model: {merged}", file=sys.stderr)
            src = describe(merged)
        elif args.merge_lora:
            log.warning("--merge_lora: %s is already a full model folder; loading it as is", src.path)
        run_args = src.run_args
        weights_dir, spec, processor_dir, adapter = resolve_source(src, args.model, args.model_type)
        ckpt = src.path
    elif args.model or args.model_type:
        weights_dir, spec = resolve_model(args.model, args.model_type, args.use_hf)
        processor_dir, run_args, ckpt = weights_dir, {}, None
    else:
        raise UserError("no model given", "pass --ckpt_dir output/.../checkpoint-N, or --model (a hub id, folder or preset)")

    check_new_tokens(weights_dir, args.max_new_tokens)
    template = run_args.get("template") or template_name(weights_dir, spec)
    processor = load_processor(processor_dir)
    tmpl = Template(processor, template, None, run_args.get("system"))
    max_pixels = args.max_pixels or run_args.get("max_pixels")
    tmpl.set_pixels(max_pixels, run_args.get("min_pixels"))
    model = load_model(weights_dir, dtype, device=device, quant_bits=args.quant_bits)
    if adapter is not None:
        from peft import PeftModel

        from ocrtune.checkpoint import load_base_overlay
        from ocrtune.compat import quiet_peft_deprecations
        load_base_overlay(model, adapter)  # a --relora_steps checkpoint's folded base weights
        try:
            with quiet_peft_deprecations():
                model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
        except (ValueError, RuntimeError, KeyError) as e:
            raise UserError(f"the adapter in {adapter} does not fit the base model {weights_dir}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                            "pass the base model it was trained on with --model") from None
    model.eval()
    model.requires_grad_(False)
    for m in (model, getattr(model, "base_model", None)):
        if m is not None and hasattr(m, "config"):
            m.config.use_cache = True
    info = {"kind": "lora" if adapter is not None else ("model" if ckpt else "base"),
            "ckpt_dir": str(ckpt) if ckpt else None, "model_dir": str(weights_dir), "template": template,
            "max_pixels": max_pixels, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "quant_bits": args.quant_bits,
            "run_args": run_args}
    return InferEngine(model, processor, tmpl), info
