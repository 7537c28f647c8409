"""Loading for `ocrtune infer`, `ocrtune eval` and `ocrtune serve`: their model source (`ocrtune.args.ModelSource`:
`--ckpt_dir`, a LoRA checkpoint, a merged or full model folder, or a run folder, classified by `ocrtune.checkpoint`;
or `--model` alone, found by `ocrtune.models`) -> an `InferEngine`."""
from __future__ import annotations

import logging
import sys

from ocrtune.args import ModelSource

log = logging.getLogger("ocrtune")


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def load_for_inference(args):
    """Build the engine for the model source of `args` (InferArgs or ServeArgs: `--ckpt_dir`, a LoRA checkpoint,
    merged/full model folder or run folder, or `--model` alone) with room for `args.max_new_tokens`. Returns
    (InferEngine, info) where info tells what was loaded and the run's settings."""
    from ocrtune.checkpoint import describe
    from ocrtune.export.source import load_adapted
    from ocrtune.models.dtypes import pick_device, pick_dtype
    from ocrtune.models.generate import InferEngine
    from ocrtune.models.loading import check_new_tokens, load_processor, resolve_model, template_name
    from ocrtune.models.patches import PatchOptions, prepare
    from ocrtune.models.registry import DEFAULT_MODEL
    from ocrtune.models.source import resolve_source
    from ocrtune.models.template import Template

    sampled = (getattr(args, "temperature", 0) or 0) > 0 or (getattr(args, "num_beams", 1) or 1) > 1
    if getattr(args, "decode", "auto") == "static" and sampled:
        print("note: --decode static decodes greedy batches; this run samples or searches beams, which decode with "
              "generate", file=sys.stderr)
    max_new_tokens, decode, args = args.max_new_tokens, getattr(args, "decode", "auto"), ModelSource.of(args)

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
    else:  # --model, --model_type, else the bundled reader
        model = args.model or (None if args.model_type else DEFAULT_MODEL)
        weights_dir, spec = resolve_model(model, args.model_type, args.use_hf)
        processor_dir, run_args, ckpt = weights_dir, {}, None

    check_new_tokens(weights_dir, max_new_tokens)
    template = run_args.get("template") or template_name(weights_dir, spec)
    processor = load_processor(processor_dir)
    tmpl = Template(processor, template, None, run_args.get("system"))
    max_pixels = args.max_pixels or run_args.get("max_pixels")
    tmpl.set_pixels(max_pixels, run_args.get("min_pixels"))
    model = load_adapted(weights_dir, adapter, dtype, device, args.quant_bits)
    model.eval()
    model.requires_grad_(False)
    # the ViT's attention in one varlen call per block (CUDA, half precision; the stock forward elsewhere)
    prepare(model, PatchOptions(patch_embed=False, vision_varlen=True))
    for m in (model, getattr(model, "base_model", None)):
        if m is not None and hasattr(m, "config"):
            m.config.use_cache = True
    info = {"kind": "lora" if adapter is not None else ("model" if ckpt else "base"),
            "ckpt_dir": str(ckpt) if ckpt else None, "model_dir": str(weights_dir), "template": template,
            "max_pixels": max_pixels, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "quant_bits": args.quant_bits,
            "run_args": run_args}
    return InferEngine(model, tmpl.processor, tmpl, decode=decode), info
