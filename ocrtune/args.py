"""Argument helpers every command shares (foundation layer; issue 14).

`arg()` declares a dataclass field with its help text, aliases, choices and environment default;
`given_flags()` says which fields were set explicitly. Moved here from `ocrtune/train/args.py` and
`ocrtune/cli/parsing.py`, which re-export them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field


def arg(default=None, help: str = "", aliases: tuple[str, ...] = (), choices=None, env: str | None = None):
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices, "env": env})


# Flags several commands share (model, checkpoint, dtype, image size, generation length), declared once here
# (issue 14). Each call returns a fresh dataclass field; a command passes `help` (or `choices`) only where its
# wording or accepted values really differ.
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


def model_arg(help: str = "base model (hub id, folder or preset) when no --ckpt_dir is given"):
    return arg(None, help, aliases=("--model_id_or_path",))


def model_type_arg(help: str = "registry name, e.g. qwen2-vl-7b-instruct"):
    return arg(None, help)


def use_hf_arg():
    return arg(True, "download from Hugging Face (true) or ModelScope (false)", env="USE_HF")


def ckpt_dir_arg(help: str = "checkpoint folder from ocrtune sft (reads the run's args.json), or a merged folder"):
    return arg(None, help)


def merge_lora_arg(default: bool = False,
                   help: str = "merge the LoRA adapter into the weights first (writes checkpoint-N-merged/)"):
    return arg(default, help)


def dtype_arg(help: str = "auto, bfloat16, float16 or float32", choices=DTYPE_CHOICES, aliases=("--torch_dtype",)):
    return arg("auto", help, aliases=aliases, choices=choices)


def max_pixels_arg(help: str):
    return arg(None, help, env="MAX_PIXELS")


def max_new_tokens_arg(default: int, help: str):
    return arg(default, help)


def quant_bits_arg(help: str = "run the base model's linears in 4 bits (NF4, bitsandbytes) or 8 (LLM.int8); "
                                "default: unquantized"):
    return arg(None, help, aliases=("--quantization_bit",))


def given_flags(args) -> set[str]:
    """Fields set explicitly: on the command line when `args` came from `build`, otherwise (built in
    Python) those that differ from the dataclass defaults. Environment-variable defaults don't count."""
    given = getattr(args, "_given_flags", None)
    if given is not None:
        return set(given)
    return {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}
