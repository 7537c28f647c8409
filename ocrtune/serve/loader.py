"""Load the one model instance the server uses, the same way `ocrtune infer` does
(`ocrtune.infer.load.load_for_inference` over the model-source flags, `ocrtune.args.ModelSource`)."""
from __future__ import annotations

from pathlib import Path


def default_model_name(args) -> str:
    """--served_model_name, else --model, else the checkpoint as '<run>/<checkpoint-N>'."""
    if args.served_model_name:
        return args.served_model_name
    if args.ckpt_dir:
        p = Path(args.ckpt_dir).expanduser().resolve()
        return f"{p.parent.name}/{p.name}" if p.name.startswith("checkpoint") else p.name
    from ocrtune.models.registry import DEFAULT_MODEL
    return args.model or args.model_type or DEFAULT_MODEL


def load_engine(args):
    """-> (InferEngine, info dict) for ServeArgs."""
    from ocrtune.infer.load import load_for_inference
    return load_for_inference(args)
