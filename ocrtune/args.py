"""Argument helpers every command shares (foundation layer).

`arg()` declares a dataclass field with its help text, aliases, choices, environment default and, for a
number, its domain (`Domain`: the values it may take; `check_domains` refuses the others, for every command
at parse time); `given_flags()` says which fields were set explicitly. `ModelSource` groups the model-source
flags several commands share.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ocrtune.errors import UserError


@dataclass(frozen=True)
class Domain:
    """The values a numeric flag may take: finite numbers from `lo` to `hi` (either end excluded when
    `lo_open`/`hi_open`), whole ones when `integer`, plus the `special` values (e.g. -1 for "off"),
    described in words by `special_help`. Every numeric flag has both bounds: 10**20 is a typo, never a setting."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    special: tuple = ()
    special_help: str = ""

    def contains(self, value) -> bool:
        if value in self.special and not (isinstance(value, float) and math.isnan(value)):
            return True
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.integer and value != int(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return above and below

    def allowed(self) -> str:
        """The domain in words: 'from 1 to 4096', 'above 0, up to 10', 'from 0 to below 1' (+ the special values)."""
        lo, hi = _num(self.lo), _num(self.hi)
        low = f"above {lo}," if self.lo_open else f"from {lo}"
        high = f"{'' if self.lo_open else 'to '}below {hi}" if self.hi_open else f"{'up ' if self.lo_open else ''}to {hi}"
        words = f"{'a whole number' if self.integer else 'a number'} {low} {high}"
        return f"{self.special_help} or {words}" if self.special_help else words

    def problem(self, value) -> str:
        """What is wrong with `value`, as the end of 'must be ...'."""
        if isinstance(value, float) and not math.isfinite(value):
            return "a finite number"
        if self.integer and isinstance(value, float) and value != int(value):
            return "a whole number"
        if value < self.lo or (self.lo_open and value == self.lo):
            low = ("positive" if self.lo == 0 else f"above {_num(self.lo)}") if self.lo_open else f"at least {_num(self.lo)}"
            return f"{self.special_help} or {low}" if self.special_help else low
        return f"below {_num(self.hi)}" if self.hi_open else f"at most {_num(self.hi)}"


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def ints(lo: int, hi: int, special: tuple = (), special_help: str = "") -> Domain:
    return Domain(lo, hi, integer=True, special=special, special_help=special_help)


def reals(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Domain:
    return Domain(lo, hi, lo_open, hi_open)


def positive(hi: float) -> Domain:
    """Above 0, up to `hi` (learning rates, seconds, sizes in MB)."""
    return Domain(0, hi, lo_open=True)


SHARE = Domain(0, 1, hi_open=True)  # a share of something that can't be all of it (dropout, warm-up ratio)
SEED = ints(0, 2**32 - 1)  # what numpy's and torch's seeding accept
BIG = 10**9  # steps, rows: beyond any run, still far below what a typo (10**20) gives


def arg(default=None, help: str = "", aliases: tuple[str, ...] = (), choices=None, env: str | None = None,
        domain: Domain | None = None):
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices, "env": env,
                                            "domain": domain})


def check_domain(f: dataclasses.Field, value, env: str | None = None) -> None:
    """UserError unless `value` (None: not set) lies in field `f`'s domain; `env` names the environment
    variable the value came from."""
    domain = f.metadata.get("domain")
    if value is None or domain is None or domain.contains(value):
        return
    source = f" from the environment variable {env}" if env else ""
    raise UserError(f"--{f.name} must be {domain.problem(value)}, got {value}{source}", f"use {domain.allowed()}")


def check_domains(args, from_env: dict[str, str] | None = None) -> None:
    """Every field of the dataclass `args` in its domain (`from_env`: field -> the variable that set it)."""
    for f in dataclasses.fields(args):
        check_domain(f, getattr(args, f.name), (from_env or {}).get(f.name))


# Flags several commands share (model, checkpoint, dtype, image size, generation length), declared once here.
# Each call returns a fresh dataclass field; a command passes `help` (or `choices`) only where its
# wording or accepted values really differ.
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")


def model_arg(help: str = "base model (hub id, folder or preset) when no --ckpt_dir is given; default ocrtune-reader, "
                          "the bundled formula reader"):
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


PIXELS = ints(28 * 28 * 4, 2**30)  # at least 4 patches; far beyond the largest image a dataset may hold
NEW_TOKENS = ints(1, 2**20)  # also checked against the model's positions once its config is read


def max_pixels_arg(help: str):
    return arg(None, help, env="MAX_PIXELS", domain=PIXELS)


def tex_root_arg(used_by: str):
    return arg(None, f"{used_by}: unpacked portable TeX bundle (scripts/make_tex_bundle.sh) instead of the system "
                     "pdflatex", env="OCRTUNE_TEX_ROOT")


def decode_arg():
    return arg("auto", "greedy decoding: static (static KV cache, one CUDA graph replay a token), dynamic (drops rows "
                       "that ended), auto (static on a GPU, dynamic on the CPU)",
               choices=("auto", "static", "dynamic"))


def max_new_tokens_arg(default: int, help: str):
    return arg(default, help, domain=NEW_TOKENS)


def quant_bits_arg(help: str = "run the base model's linears in 4 bits (NF4, bitsandbytes) or 8 (LLM.int8); "
                                "default: unquantized"):
    return arg(None, help, aliases=("--quantization_bit",), choices=(4, 8), domain=ints(4, 8))


@dataclass
class ModelSource:
    """The model-source flags `infer`, `eval`, `serve` and `export` share: what to load (`--ckpt_dir`, or
    `--model`/`--model_type` from `--use_hf`'s hub), how (`--dtype`, `--quant_bits`, `--max_pixels`) and whether
    a LoRA checkpoint is merged first (`--merge_lora`, again with `--force`). Each command declares the fields
    with the helpers above (its own help wording and flag order); `of` reads them back from its args."""
    ckpt_dir: str | None = ckpt_dir_arg()
    model: str | None = model_arg()
    model_type: str | None = model_type_arg()
    use_hf: bool = use_hf_arg()
    merge_lora: bool = merge_lora_arg()
    force: bool = arg(False, "merge again even if the merged folder exists")
    dtype: str = dtype_arg()
    quant_bits: int | None = quant_bits_arg()
    max_pixels: int | None = max_pixels_arg("largest image size in pixels (default: the run's)")

    @classmethod
    def of(cls, args) -> ModelSource:
        """The model source of a command's args (fields a command lacks keep their defaults)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def given_flags(args) -> set[str]:
    """Fields set explicitly: on the command line when `args` came from `build`, otherwise (built in
    Python) those that differ from the dataclass defaults. Environment-variable defaults don't count."""
    given = getattr(args, "_given_flags", None)
    if given is not None:
        return set(given)
    return {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}


def replaced(args, **changes):
    """dataclasses.replace keeping the record of the flags typed on the command line (`_given_flags`, which
    `given_flags` reads for a resume, --speed max and a model's sft defaults): the changed fields were not typed."""
    out = dataclasses.replace(args, **changes)
    if hasattr(args, "_given_flags"):
        out._given_flags = args._given_flags
    return out
