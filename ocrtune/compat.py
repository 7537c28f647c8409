"""Where ocrtune meets library APIs that moved between the versions pyproject.toml allows."""
from __future__ import annotations

import contextlib
import os
import warnings

# Packed steps change shape every step, and the CUDA caching allocator's fixed segments fragment under
# that: 7B LoRA at 8,192 tokens without recompute held 47.0 GiB but reserved 66.6 GiB. Expandable
# segments grow in place instead: 47.5 GiB reserved and 4% faster on an H200
# (bench/results/frontier_7b_lean_mlp_dropout0{,_expandable}.json). NeMo sets the same default.
ALLOCATOR_DEFAULT = "expandable_segments:True"
ALLOCATOR_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")  # old, new, ROCm's name


def enable_activation_checkpointing(model, use_reentrant: bool = False) -> None:
    """transformers >= 5.24 renamed gradient checkpointing to activation checkpointing (the old name
    warns); older 5.x only has the old name."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def quiet_peft_deprecations():
    """peft (<= 0.21) reads `model.is_gradient_checkpointing`, which transformers >= 5.24 deprecates
    with a FutureWarning on every command; the call is peft's, not ours, so only that one is hidden."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def default_cuda_allocator(env=os.environ) -> bool:
    """Turn on expandable segments unless the user configured the allocator (PYTORCH_CUDA_ALLOC_CONF, its
    newer name PYTORCH_ALLOC_CONF, or ROCm's PYTORCH_HIP_ALLOC_CONF). Must run before torch first touches
    CUDA; the entry points call it first thing. Returns whether it set the default."""
    if any(name in env for name in ALLOCATOR_VARS):
        return False
    env["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_DEFAULT
    return True


# torchvision 0.N is built for torch 2.(N-15) only (0.26 <-> 2.11, 0.29 <-> 2.14): installing torch alone
# and then a newer torchvision (or the reverse) leaves a pair whose import fails inside transformers, which
# reports it as "Could not import module 'Qwen2VLForConditionalGeneration'" and names neither package.
TORCHVISION_MINOR_OFFSET = 15
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def _minor(version: str) -> tuple[int, int] | None:
    parts = version.split("+")[0].split(".")
    return (int(parts[0]), int(parts[1])) if len(parts) > 1 and parts[0].isdigit() and parts[1].isdigit() else None


def pair_fix(torch_version: str | None) -> str:
    """The pip command that installs a matching torch/torchvision pair within pyproject's bounds."""
    index = f" --index-url {CPU_INDEX}" if torch_version is None or "+cpu" in torch_version else ""
    tm = _minor(torch_version) if torch_version else None
    if tm and tm[0] == 2:
        pins = f'"torch=={tm[0]}.{tm[1]}.*" "torchvision==0.{tm[1] + TORCHVISION_MINOR_OFFSET}.*"'
    else:
        pins = '"torch>=2.11,<2.15" "torchvision<0.30"'
    return f"install torch and torchvision together so pip picks a matching pair: pip install {pins}{index}"


def check_torch_stack() -> None:
    """Raise a one-line UserError if torch or torchvision can't be imported or they don't belong together;
    run before a command loads a model (a broken pair otherwise fails deep inside transformers)."""
    from ocrtune.errors import UserError, first_line
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any failure here makes every command fail
        raise UserError(f"torch does not import ({first_line(e)})", pair_fix(None)) from None
    try:
        import torchvision
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] == "torchvision":
            return  # absent, not broken: transformers then uses its PIL image processors
        raise UserError(f"torchvision does not import with torch {torch.__version__} ({first_line(e)})",
                        pair_fix(torch.__version__)) from None
    except Exception as e:  # noqa: BLE001 - a torchvision built for another torch raises RuntimeError, OSError, ...
        raise UserError(f"torchvision does not import with torch {torch.__version__} ({first_line(e)})",
                        pair_fix(torch.__version__)) from None
    problem = pair_problem(torch.__version__, getattr(torchvision, "__version__", ""))
    if problem:
        raise UserError(problem, pair_fix(torch.__version__))


def pair_problem(torch_version: str, tv_version: str) -> str | None:
    """Why these two builds don't belong together (another minor release, or CPU against CUDA), or None."""
    tm, vm = _minor(torch_version), _minor(tv_version)
    if tm and vm and tm[0] == 2 and vm[0] == 0 and vm[1] != tm[1] + TORCHVISION_MINOR_OFFSET:
        return f"torchvision {tv_version} is built for torch 2.{vm[1] - TORCHVISION_MINOR_OFFSET}, but torch {torch_version} is installed"
    t_tag, v_tag = (v.partition("+")[2] for v in (torch_version, tv_version))
    if t_tag and v_tag and (t_tag == "cpu") != (v_tag == "cpu"):
        return f"torchvision {tv_version} and torch {torch_version} are builds for different devices (CPU and CUDA)"
    return None
