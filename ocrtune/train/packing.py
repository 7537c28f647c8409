"""Moved (issue 14): the data packing (`mrope_positions`, `pack`, `token_budget_batches`) to
`ocrtune/data/packing.py`, the attention that keeps packed samples apart (text and ViT varlen) to
`ocrtune/models/qwen_vl.py`. Both halves are re-exported here for old imports (tests, bench/)."""
from __future__ import annotations

from ocrtune.data.packing import mrope_positions, pack, token_budget_batches
from ocrtune.models.qwen_vl import (_VARLEN, _block_causal_mask, _get_varlen, _varlen_fn, _vision_attention_forward,
                                    install_varlen_sdpa, packed_attention, patch_vision_varlen, varlen_dtype)

__all__ = ["mrope_positions", "pack", "token_budget_batches", "_varlen_fn", "_VARLEN", "_block_causal_mask",
           "packed_attention", "varlen_dtype", "_get_varlen", "_vision_attention_forward", "patch_vision_varlen",
           "install_varlen_sdpa"]
