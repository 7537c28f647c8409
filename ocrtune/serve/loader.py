"""Load the one model instance the server uses, the same way `ocrtune infer` does
(`ocrtune.infer.load.load_for_inference`: --model, or --ckpt_dir with a LoRA or full checkpoint; what a
checkpoint folder holds and which folders it loads is resolved by `ocrtune.checkpoint`)."""
from __future__ import annotations

from pathlib import Path


def infer_args(args):
    """ServeArgs -> InferArgs (the fields loading reads)."""
    from ocrtune.infer.args import InferArgs
    return InferArgs(ckpt_dir=args.ckpt_dir, model=args.model, model_type=args.model_type, use_hf=args.use_hf,
                     merge_lora=args.merge_lora, max_pixels=args.max_pixels, dtype=args.dtype,
                     quant_bits=args.quant_bits, max_new_tokens=args.max_new_tokens)


def default_model_name(args) -> str:
    """--served_model_name, else --model, else the checkpoint as '<run>/<checkpoint-N>'."""
    if args.served_model_name:
        return args.served_model_name
    if args.ckpt_dir:
        p = Path(args.ckpt_dir).expanduser().resolve()
        return f"{p.parent.name}/{p.name}" if p.name.startswith("checkpoint") else p.name
    return args.model or args.model_type or "model"


def load_engine(args):
    """-> (InferEngine, info dict) for ServeArgs."""
    from ocrtune.infer.load import load_for_inference
    return load_for_inference(infer_args(args))
