"""Moved to `ocrtune/models/qwen_vl.py` (issue 14: every private transformers/PEFT dependence in one module):
Liger wiring (`apply_liger`, `liger_fused_ce`, `liger_unavailable_reason`), fused LoRA (`fuse_lora_linears`)
and the recompute limit (`limit_recompute`). Re-exported here for old imports (tests, bench/)."""
from __future__ import annotations

from ocrtune.models.qwen_vl import (_APPLY, _fallback, _fused_lora_forward, apply_liger, fuse_lora_linears,
                                    liger_fused_ce, liger_unavailable_reason, limit_recompute)

__all__ = ["_APPLY", "_fallback", "liger_unavailable_reason", "apply_liger", "liger_fused_ce", "_fused_lora_forward",
           "fuse_lora_linears", "limit_recompute"]
