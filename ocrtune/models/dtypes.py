"""The dtype and device policy, in one place.

One table of names (`DTYPES`) and one rule (`dtype_for`) for `--dtype`/`--torch_dtype`; what `auto` means
depends on what the weights are for:

* Inference and serving (`"infer"`, also `pick_dtype`): `auto` = bf16 on CUDA (fp16 where bf16 is missing),
  fp32 on CPU.
* Training (`"train"`, also `train_dtype`): `auto` = bf16 on CUDA with bf16 support, otherwise fp32 (never
  fp16: training in fp16 without a loss scaler is not supported).
* Merging (`"merge"`): `auto` = the dtype the base model's weights are stored in (`stored_dtype`).

`pick_device` is where inference decides where to run.
"""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float32": torch.float32, "fp32": torch.float32}


def pick_device() -> torch.device:
    """The one place inference decides where to run: the current CUDA device if any, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def dtype_for(name: str | None, purpose: str, device: torch.device | None = None,
              model_dir: Path | None = None) -> torch.dtype:
    """The torch dtype for `--dtype name` (None or "auto", or a name in `DTYPES`) when the weights are used for
    `purpose`: "infer" (auto: bf16 on CUDA, fp16 where bf16 is missing, fp32 on CPU; needs `device`),
    "train" (auto: bf16 on CUDA with bf16 support, else fp32; needs `device`) or "merge" (auto: the dtype
    the weights in `model_dir` are stored in). An unknown name is a UserError."""
    if name in (None, "auto"):
        if purpose == "merge":
            return stored_dtype(model_dir)
        if purpose == "train":
            return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        from ocrtune.errors import UserError
        raise UserError(f"unknown --dtype '{name}'", "use auto, bfloat16, float16 or float32")
    return DTYPES[name]


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on CUDA (fp16 where bf16 is missing), fp32 on CPU; otherwise the named dtype."""
    return dtype_for(name, "infer", device)


def train_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on CUDA with bf16 support, otherwise fp32; otherwise the named dtype."""
    return dtype_for(name, "train", device)


def stored_dtype(model_dir: Path):
    """The dtype the base model's weights are stored in (config.json), fp32 if not stated."""
    import torch

    from ocrtune.models.loading import model_config
    cfg = model_config(model_dir)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype") \
        or (cfg.get("text_config") or {}).get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)
