"""Moved to `ocrtune/models/qwen_vl.py` (issue 14: every private transformers/PEFT dependence in one module);
these names are re-exported for old imports (tests/test_kernels.py)."""
from __future__ import annotations

from ocrtune.models.qwen_vl import _is_patchwise, _patch_embed_as_linear, linear_patch_embed, replace_forward

__all__ = ["replace_forward", "_patch_embed_as_linear", "_is_patchwise", "linear_patch_embed"]
