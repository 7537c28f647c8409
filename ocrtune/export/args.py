"""Arguments of `ocrtune export` (SWIFT's names); its model-source flags are those of `ocrtune.args.ModelSource`."""
from __future__ import annotations

from dataclasses import dataclass

from ocrtune.args import arg, dtype_arg, merge_lora_arg


@dataclass
class ExportArgs:
    ckpt_dir: str | None = arg(None, "LoRA checkpoint folder from ocrtune sft")
    merge_lora: bool = merge_lora_arg(True, "merge the adapter into the base weights")
    output_dir: str | None = arg(None, "where to write (default: <ckpt_dir>-merged)")
    force: bool = arg(False, "overwrite an existing merged folder")
    dtype: str = dtype_arg("weights dtype of the merged model: auto (the base's), bfloat16, float16, float32", choices=None, aliases=())
