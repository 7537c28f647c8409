"""Where ocrtune meets library APIs that moved between the versions pyproject.toml allows."""
from __future__ import annotations

import contextlib
import warnings


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
