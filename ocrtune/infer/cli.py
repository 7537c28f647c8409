"""`ocrtune infer` (interactive, one-shot, or over a dataset) and `ocrtune eval` (a dataset + OCR metrics).

The work is in `ocrtune.infer.load` (model/checkpoint loading), `ocrtune.infer.interactive` (the interactive loop
and one-shot answers) and `ocrtune.infer.dataset` (dataset mode: rows, results, metrics, table); this module
validates the arguments and dispatches.
What `--ckpt_dir` may be, and how the base model is found, is in `ocrtune.checkpoint`; merging is
`ocrtune.export.merge`; device and dtype choice is `ocrtune.models.dtypes.pick_device/pick_dtype`.
"""
from __future__ import annotations

import json
from pathlib import Path

from ocrtune.errors import UserError
from ocrtune.infer.args import InferArgs
from ocrtune.infer.dataset import (METRIC_CHOICES, check_metric_tools, format_table, parse_metrics, run_dataset,
                                   summary_path_for)
from ocrtune.infer.interactive import interactive, one_shot
from ocrtune.infer.load import _quiet_transformers, load_for_inference

# ---------------------------------------------------------------- arguments

def validate(args: InferArgs) -> None:
    checks = [
        (args.infer_batch_size >= 1, "--infer_batch_size must be at least 1"),
        (args.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
        (args.num_beams >= 1, "--num_beams must be at least 1"),
        (args.temperature >= 0, "--temperature must be 0 (greedy) or positive"),
        (0 < args.top_p <= 1, "--top_p must be in (0, 1]"),
        (args.max_pixels is None or args.max_pixels >= 28 * 28 * 4, "--max_pixels must be at least 3136 (4 patches)"),
        (not (args.merge_lora and not args.ckpt_dir), "--merge_lora needs --ckpt_dir (the LoRA checkpoint to merge)"),
        (not (args.image and dataset_mode(args)), "--image (one-shot) and --load_dataset_config/--dataset can't be combined"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message, "see `ocrtune infer --help`")
    check_quant_bits(args.quant_bits)


def check_quant_bits(bits: int | None) -> None:
    """--quant_bits of infer, eval and serve: 4 or 8 (bitsandbytes), or none."""
    if bits is not None and bits not in (4, 8):
        raise UserError(f"--quant_bits {bits}: bitsandbytes quantizes to 4 or 8 bits",
                        "pass --quant_bits 4 (NF4) or 8, or drop it to run the unquantized model")


def dataset_mode(args: InferArgs) -> bool:
    return bool(args.load_dataset_config or args.dataset or args.val_dataset)


# ---------------------------------------------------------------- entry points

def run_infer(args: InferArgs):
    """`ocrtune infer`: a dataset (`--load_dataset_config`/`--dataset`), one-shot (`--image`/`--query`),
    or the interactive loop."""
    validate(args)
    _quiet_transformers()
    if dataset_mode(args):
        metrics = parse_metrics(args.metrics)
        check_metric_tools(metrics, args)
        engine, info = load_for_inference(args)
        summary = run_dataset(engine, info, args, metrics)
        print(json.dumps(summary, ensure_ascii=False))
        return summary
    engine, info = load_for_inference(args)
    if args.image or args.query:
        return one_shot(engine, args)
    interactive(engine, args)
    return None


def run_eval(args: InferArgs) -> dict:
    """`ocrtune eval`: dataset mode plus `--metrics`; prints a table and writes <results>.jsonl and
    <results>_summary.json. Without a dataset flag it uses the run's own validation split."""
    validate(args)
    if args.image:
        raise UserError("ocrtune eval runs over a dataset, not one --image", "use ocrtune infer --image for one image")
    metrics = parse_metrics(args.metrics)
    if not metrics:
        raise UserError("--metrics is empty", f"pass a comma list of: {', '.join(METRIC_CHOICES)}")
    if not (args.dataset or args.val_dataset or args.load_dataset_config or args.ckpt_dir):
        raise UserError("ocrtune eval needs data", "pass --dataset (or --val_dataset), or a --ckpt_dir from an ocrtune sft run")
    check_metric_tools(metrics, args)
    _quiet_transformers()
    engine, info = load_for_inference(args)
    if not (args.dataset or args.val_dataset):
        if not info["run_args"].get("dataset") and not info["run_args"].get("val_dataset"):
            raise UserError("ocrtune eval needs data", "pass --dataset (or --val_dataset), or a --ckpt_dir from an ocrtune sft run")
        args.load_dataset_config = True
    summary = run_dataset(engine, info, args, metrics)
    summary_path = summary_path_for(Path(summary["result_path"]))
    summary["summary_path"] = str(summary_path)
    summary_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    print(format_table(summary))
    print(f"dataset: {summary['dataset']}")
    print(f"results: {summary['result_path']}")
    print(f"summary: {summary_path}")
    return summary
