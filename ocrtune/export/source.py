"""Loading a checkpoint's weights, the one way `infer`, `eval`, `serve` and `export` do it: the base model,
a `--relora_steps` run's folded base weights over it, then the LoRA adapter."""
from __future__ import annotations

from pathlib import Path

from ocrtune.checkpoint import load_base_overlay
from ocrtune.compat import quiet_peft_deprecations
from ocrtune.errors import UserError
from ocrtune.models import loading


def load_adapted(weights_dir: Path, adapter: Path | None, dtype, device, quant_bits: int | None = None,
                 command: str = "load"):
    """The model in `weights_dir` (quantized to `quant_bits` if given) with the LoRA adapter in `adapter`
    attached (a PeftModel, not trainable), or alone when `adapter` is None. `command` ("load", "export")
    words the error for a checkpoint deleted meanwhile."""
    model = loading.load_model(weights_dir, dtype, device=device, quant_bits=quant_bits)
    if adapter is None:
        return model
    from peft import PeftModel
    try:
        load_base_overlay(model, adapter)  # a --relora_steps checkpoint's folded base weights
        with quiet_peft_deprecations():
            return PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (ValueError, RuntimeError, KeyError, OSError) as e:
        if not (Path(adapter) / "adapter_model.safetensors").exists():
            raise gone(adapter, command) from None
        raise UserError(f"the adapter in {adapter} does not fit the base model {weights_dir}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0][:160]}",
                        "pass the base model it was trained on with --model") from None


def gone(ckpt: Path, command: str = "load") -> UserError:
    return UserError(f"checkpoint {ckpt} was deleted while it was being {command}ed (e.g. by --save_total_limit "
                     "of a run still training)", f"{command} a checkpoint that the run keeps, e.g. its newest one")
