"""Sharded training through accelerate: DeepSpeed ZeRO-2/3 (configs shipped in train/configs) or FSDP.
Launch with torchrun (or NPROC_PER_NODE=N ocrtune sft ...); every rank runs the same script."""
from __future__ import annotations

import json
from pathlib import Path

from ocrtune.errors import UserError

CONFIGS = Path(__file__).parent / "configs"


def deepspeed_config(value: str, args) -> dict:
    path = CONFIGS / f"{value}.json" if value in ("zero2", "zero3") else Path(value)
    if not path.exists():
        raise UserError(f"DeepSpeed config '{value}' not found", "use zero2, zero3 or a path to a DeepSpeed json config")
    config = json.loads(path.read_text())
    # fill SWIFT/HF-style "auto" values from the flags (we drive the loop ourselves)
    config["train_micro_batch_size_per_gpu"] = args.batch_size
    config["gradient_accumulation_steps"] = 1  # accumulation is done by the loop, one engine step per micro-batch group
    config["gradient_clipping"] = args.max_grad_norm
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = args.dtype in ("auto", "bfloat16", "bf16")
    return config


def plugin_kwargs(args) -> dict:
    """Accelerator(...) keyword arguments for --deepspeed / --fsdp."""
    if args.deepspeed:
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UserError("--deepspeed needs the deepspeed package", "pip install deepspeed (on a CUDA machine)") from None
        from accelerate.utils import DeepSpeedPlugin
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=deepspeed_config(args.deepspeed, args))}
    from accelerate.utils import FullyShardedDataParallelPlugin
    strategy = "SHARD_GRAD_OP" if "shard_grad_op" in args.fsdp.lower() else "FULL_SHARD"
    return {"fsdp_plugin": FullyShardedDataParallelPlugin(
        sharding_strategy=strategy, auto_wrap_policy="transformer_based_wrap",
        use_orig_params=True, state_dict_type="FULL_STATE_DICT",
        transformer_cls_names_to_wrap=["Qwen2VLDecoderLayer", "Qwen2_5_VLDecoderLayer", "Qwen3VLTextDecoderLayer",
                                       "Qwen2VLVisionBlock", "Qwen2_5_VLVisionBlock", "Qwen3VLVisionBlock"])}
