"""Varlen attention: packed text rows and the Qwen2-VL ViT, each sample (image) attending only to itself.

Text: `ResponseLoss` feeds a packed row to the language model with `cu_seq_lens_*` attention kwargs. On an sdpa
model `prepare(packing=True)` selects the attention registered here as "ocrtune_varlen" (transformers'
`AttentionInterface.register`; "sdpa" itself is left as it is): with those kwargs it runs
`torch.nn.attention.varlen.varlen_attn` (FlashAttention varlen, CUDA) or, where that is unavailable (CPU, old
torch), sdpa with a block-diagonal causal mask (exact, slower); without them it is transformers' sdpa.
flash_attention_2/3 read the same kwargs natively; eager/flex, and an sdpa model not prepared for packing, get
the 4-row position ids and transformers builds the document mask from them.

ViT: `prepare(vision_varlen=True)` routes each VisionAttention of a Qwen2-VL vision tower through one varlen
call per block on CUDA (the stock forward elsewhere).
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn as nn

from ocrtune.models.patches.common import causal_lm, replace_forward

VARLEN_ATTENTION = "ocrtune_varlen"  # the attention name `prepare(packing=True)` selects on an sdpa text model

def _varlen_fn():
    """torch's FlashAttention varlen entry point, adapted over its signature changes, or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    windowed = "window_size" in params
    gqa = "enable_gqa" in params

    def run(q, k, v, cu, max_len, scale, is_causal=True):
        if windowed:
            causal = {"window_size": (-1, 0) if is_causal else (-1, -1)}
        else:
            causal = {"is_causal": is_causal}
        if q.shape[1] != k.shape[1]:
            if gqa:
                return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, enable_gqa=True, **causal)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **causal)
    return run

_VARLEN = {"fn": None, "checked": False, "warned_fp32": False}

def _block_causal_mask(cu: torch.Tensor, total: int, device) -> torch.Tensor:
    seg = torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), (cu[1:] - cu[:-1]).to(device).long())
    if seg.numel() < total:  # trailing tokens outside every sample: their own segment
        seg = torch.cat([seg, seg.new_full((total - seg.numel(),), len(cu))])
    pos = torch.arange(total, device=device)
    return (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])

def packed_attention(module, query, key, value, cu, max_len, scaling=None):
    """Causal attention within each packed sample. query/key/value [1, H, T, D] -> [1, T, H, D]."""
    if query.shape[0] != 1:
        raise ValueError("packed attention expects a batch of one packed row")
    if query.is_cuda and not _VARLEN["checked"]:
        if _get_varlen() is None:
            warnings.warn("torch.nn.attention.varlen is unavailable: packed attention uses sdpa with a "
                          "block-diagonal mask (correct, slower)", stacklevel=2)
    fn = _VARLEN["fn"] if query.is_cuda else None
    dtype = varlen_dtype(query)
    if fn is not None and dtype is not None:
        # squeeze, not [0]: a select's backward writes the gradient into a zeroed [1, H, T, D] copy (and RoPE's
        # backward then copies it again to make it contiguous); a squeeze's is a view
        q, k, v = (t.squeeze(0).transpose(0, 1).to(dtype) for t in (query, key, value))  # [T, H, D]
        try:
            out = fn(q, k, v, cu.to(q.device, torch.int32), int(max_len), scaling)
            return out.unsqueeze(0)
        except (RuntimeError, TypeError, ValueError) as e:  # kernel not built for this device / dtype
            warnings.warn(f"varlen attention failed ({type(e).__name__}: {str(e)[:120]}); falling back to a "
                          "block-diagonal sdpa mask", stacklevel=2)
            _VARLEN["fn"] = None
    if fn is not None and dtype is None and not _VARLEN["warned_fp32"]:
        _VARLEN["warned_fp32"] = True
        warnings.warn("packed attention on float32 tensors uses sdpa with a dense block mask (correct, slow, "
                      "memory grows with tokens^2): train in bf16 (--dtype auto) or under bf16 autocast", stacklevel=2)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    mask = _block_causal_mask(cu, query.shape[2], query.device)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()

def varlen_dtype(query: torch.Tensor):
    """The half dtype the varlen kernel runs in for `query`, or None. Under autocast that is the
    autocast dtype even for float32 inputs (the rotary step promotes q and k to float32 when the
    embeddings are float32, i.e. float32 master weights); sdpa would be autocast to it the same way,
    and without this a float32 packed row fell back to a dense [T, T] mask."""
    if query.dtype in (torch.float16, torch.bfloat16):
        return query.dtype
    if query.dtype == torch.float32 and torch.is_autocast_enabled(query.device.type):
        return torch.get_autocast_dtype(query.device.type)
    return None

def _get_varlen():
    if not _VARLEN["checked"]:
        _VARLEN["checked"] = True
        _VARLEN["fn"] = _varlen_fn()
    return _VARLEN["fn"]

def _vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """Qwen2-VL VisionAttention with all images in one varlen call (instead of one sdpa call per
    image); the stock forward wherever the varlen kernel or `max_seqlen` is missing."""
    half = hidden_states.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled("cuda")
    fn = _get_varlen() if hidden_states.is_cuda and half else None
    if fn is None or max_seqlen is None:
        return self._ocrtune_stock_forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings,
                                           max_seqlen=max_seqlen, **kwargs)
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    out = fn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens.to(torch.int32), int(max_seqlen),
             self.scaling, is_causal=False)
    return self.proj(out.reshape(n, -1))

def patch_vision_varlen(visual) -> bool:
    """Route a Qwen2-VL vision tower's attention through one varlen call per block (CUDA only;
    the patched forward defers to the stock one elsewhere). Returns whether anything was patched."""
    attns = [getattr(blk, "attn", None) for blk in getattr(visual, "blocks", [])]
    patched = [replace_forward(attn, _vision_attention_forward) for attn in attns if hasattr(attn, "qkv")]
    return any(patched)


def vision_varlen(model: nn.Module) -> bool:
    """`patch_vision_varlen` on a Qwen2-VL model's vision tower (other families have their own attention), once;
    returns whether its attention runs varlen."""
    lm = causal_lm(model)
    visual = getattr(lm.model, "visual", None)
    if getattr(lm.config, "model_type", None) != "qwen2_vl" or visual is None:
        return False
    if getattr(visual, "_ocrtune_varlen", None) is None:
        visual._ocrtune_varlen = patch_vision_varlen(visual)
    return bool(visual._ocrtune_varlen)


def _sdpa_or_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return packed_attention(module, query, key, value, cu, kwargs.get("max_length_q") or query.shape[2], scaling), None


@functools.lru_cache(maxsize=1)
def register_varlen_attention() -> bool:
    """Register "ocrtune_varlen" with transformers, once: the attention `_sdpa_or_varlen` and sdpa's mask
    function (its padded batches get the very masks "sdpa" gets). Returns whether it is registered."""
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False
    AttentionInterface.register(VARLEN_ATTENTION, _sdpa_or_varlen)
    AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
    return True


def select_varlen_attention(model: nn.Module) -> bool:
    """Select "ocrtune_varlen" on the text model of an sdpa model (flash attention reads the varlen kwargs
    itself; eager and flex keep the document mask). Returns whether packed rows run varlen attention."""
    text = getattr(causal_lm(model).model, "language_model", None)
    impl = getattr(getattr(text, "config", None), "_attn_implementation", None) or "sdpa"
    if impl == VARLEN_ATTENTION or "flash" in impl:
        return True
    if impl != "sdpa" or not register_varlen_attention():
        return False
    text.config._attn_implementation = VARLEN_ATTENTION
    return True
