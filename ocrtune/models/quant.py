"""bitsandbytes-quantized base weights (QLoRA): `--quant_method bnb --quant_bits 4|8`.

4 bits is QLoRA as PEFT/transformers do it: NF4 with double quantization (the absmax scales quantized too), matmuls
in bfloat16. Only linear layers are quantized; the LM head and embeddings stay unquantized, and so does the vision
tower unless `quant_vit` (its linears are a small share of the weights, and its output feeds every image token).
bitsandbytes is an optional extra (`pip install "ocrtune[qlora]"`): nothing here imports it at module level.
"""
from __future__ import annotations

from ocrtune.errors import UserError

QUANT_BITS = (4, 8)
QUANT_METHODS = ("bnb",)
# the first release with CPU kernels for 4-bit (and 8-bit) matmuls; older ones need a CUDA device
BNB_CPU_MIN = (0, 48)
# module-name patterns transformers leaves unquantized (matched from the start of a module's full name, and as
# substrings by older releases): the LM head always, the vision tower (and its merger) unless --quant_vit
HEAD_SKIP, VIT_SKIP = ["lm_head"], ["model.visual"]
INSTALL_FIX = 'pip install "ocrtune[qlora]" (bitsandbytes)'


def bnb_version() -> tuple[int, ...] | None:
    """bitsandbytes' version as numbers, or None where it is not installed."""
    from importlib import metadata
    try:
        text = metadata.version("bitsandbytes")
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


def check_quant_backend(bits: int, device_type: str, version: tuple[int, ...] | None = "installed") -> None:
    """Raise a UserError where `bits`-bit weights can't run here: bitsandbytes missing, or a CPU-only machine with a
    release that has no CPU kernels. `version` is for tests (default: the installed release)."""
    version = bnb_version() if version == "installed" else version
    if version is None:
        raise UserError(f"--quant_bits {bits} quantizes the base with bitsandbytes, which is not installed",
                        f"{INSTALL_FIX}, or drop --quant_bits to train over the bf16 base (plain LoRA)")
    if device_type != "cuda" and version < BNB_CPU_MIN:
        have = ".".join(map(str, version))
        raise UserError(f"--quant_bits {bits} needs a CUDA GPU with bitsandbytes {have} (CPU kernels came in "
                        f"{'.'.join(map(str, BNB_CPU_MIN))})",
                        "run on a GPU, upgrade bitsandbytes, or drop --quant_bits (LoRA over the bf16 base)")


def skip_modules(quant_vit: bool = False) -> list[str]:
    return HEAD_SKIP + ([] if quant_vit else VIT_SKIP)


def bnb_config(bits: int, quant_vit: bool = False):
    """transformers' BitsAndBytesConfig for `bits` (4: NF4, double quantization, bf16 compute; 8: LLM.int8)."""
    import torch
    from transformers import BitsAndBytesConfig
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip_modules(quant_vit))
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules(quant_vit))


def is_bnb_linear(module) -> bool:
    """A bitsandbytes quantized linear (its `.weight` holds packed integers, not the weight's values)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and type(module).__module__.startswith("bitsandbytes")


def quantized_names(model) -> list[str]:
    """Full names of the model's bitsandbytes linears (PEFT wrappers' base layers included)."""
    return [name for name, mod in model.named_modules() if is_bnb_linear(mod)]


def model_quant_bits(model) -> int | None:
    """4 or 8 where transformers loaded `model` quantized by bitsandbytes, else None."""
    for m in (model, getattr(model, "base_model", None), getattr(getattr(model, "base_model", None), "model", None)):
        if m is None:
            continue
        if getattr(m, "is_loaded_in_4bit", False):
            return 4
        if getattr(m, "is_loaded_in_8bit", False):
            return 8
    return None


def dequantized_weight(module):
    """A bitsandbytes linear's weight in its compute dtype (a new tensor; for checks, not for the step)."""
    from peft.utils.integrations import dequantize_bnb_weight
    return dequantize_bnb_weight(module.weight, state=getattr(module, "state", None))


def keep_training_layout(model) -> int:
    """Keep bitsandbytes' 4-bit linears in their one weight layout. On CPUs with AVX512-BF16 a no-grad eval-mode
    forward repacks the weight for its inference kernel, and the training forwards after it (a run's evaluation,
    then its next step) fail in that kernel's in-place bias add. Returns how many layers were set."""
    n = 0
    for mod in model.modules():
        if hasattr(mod, "support_avx512bf16_for_cpu") and is_bnb_linear(mod):
            mod.support_avx512bf16_for_cpu = False
            n += 1
    return n
