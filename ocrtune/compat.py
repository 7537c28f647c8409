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
