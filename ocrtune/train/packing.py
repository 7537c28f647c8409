"""Padding-free packing: several encoded samples in one row, each with its own positions, and
attention that cannot cross sample boundaries.

`pack(samples, pad_id)` concatenates samples into a batch of one row and adds
- `position_ids` [4, 1, T]: row 0 the text positions (0..len-1 restarting at each sample, the
  transformers 5 convention for packed rows), rows 1-3 each sample's own M-RoPE (t, h, w) positions,
  computed by `mrope_positions` exactly as Qwen2-VL's `get_rope_index` does for that sample alone;
- `cu_seq_lens` [n+1] (int32) and `max_length`: sample boundaries for variable-length attention.

`ResponseLoss` (loss.py) feeds packed batches to the language model with `cu_seq_lens_*` attention
kwargs. For sdpa models `install_varlen_sdpa()` wraps transformers' sdpa attention so that, when those
kwargs are present, it runs `torch.nn.attention.varlen.varlen_attn` (FlashAttention varlen, CUDA)
or, where that is unavailable (CPU, old torch), sdpa with a block-diagonal causal mask (exact, slower).
flash_attention_2/3 read the same kwargs natively; eager/flex get the 4-row position ids and
transformers builds the document mask from them.

`token_budget_batches` groups a seeded permutation of samples into micro-batches of at most
`budget` tokens each (the sampler behind `--packing_tokens`).
"""
from __future__ import annotations

import functools
import inspect
import itertools
import logging
import math
import warnings

import torch

from ocrtune.models.template import IGNORE_INDEX

log = logging.getLogger("ocrtune")


# ---------------------------------------------------------------- positions

def mrope_positions(types, grid_thw=None, spatial_merge_size: int = 2) -> torch.Tensor:
    """[3, L] M-RoPE positions of one sample (what `Qwen2VLModel.get_rope_index` computes for it):
    text tokens advance all three rows by one; an image block of grid (t, h, w) gets
    (start + t_idx, start + h_idx, start + w_idx) over its merged grid and advances by max(h, w)/merge."""
    types = list(types)
    grids = iter(grid_thw if grid_thw is not None else [])
    pieces, pos = [], 0
    for kind, group in itertools.groupby(types):
        n = len(list(group))
        if kind == 0:
            pieces.append(torch.arange(pos, pos + n).view(1, -1).expand(3, -1))
            pos += n
        else:
            t, h, w = (int(x) for x in next(grids))
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            if t * gh * gw != n:
                raise ValueError(f"image block of {n} tokens does not match grid {t}x{h}x{w} (merge {spatial_merge_size})")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pieces.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(gh, gw)
    if not pieces:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(pieces, dim=1).long()


# ---------------------------------------------------------------- packing

def pack(samples: list[dict], pad_token_id: int, spatial_merge_size: int = 2) -> dict:
    """One padding-free row from encoded samples (see module docstring). `pad_token_id` is unused
    (nothing is padded) and kept for the collator's signature."""
    del pad_token_id
    ids, labels, types, text_pos, mrope, lens = [], [], [], [], [], []
    for s in samples:
        n = len(s["input_ids"])
        if n == 0:
            continue
        lab = list(s["labels"])
        lab[0] = IGNORE_INDEX  # never a target of the previous sample's last token
        ids += s["input_ids"]
        labels += lab
        types += s["mm_token_type_ids"]
        text_pos.append(torch.arange(n))
        mrope.append(mrope_positions(s["mm_token_type_ids"], s.get("image_grid_thw"), spatial_merge_size))
        lens.append(n)
    position_ids = torch.cat([torch.cat(text_pos).view(1, -1), torch.cat(mrope, dim=1)], dim=0).unsqueeze(1)
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lens).cumsum(0)
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "mm_token_type_ids": torch.tensor([types]), "position_ids": position_ids,
             "cu_seq_lens": cu, "max_length": torch.tensor(max(lens))}
    with_images = [s for s in samples if "pixel_values" in s]
    if with_images:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in with_images])
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
    return batch


def token_budget_batches(lengths: list[int], budget: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                         shuffle: bool = True) -> list[list[int]]:
    """This rank's micro-batches of row indices for one epoch, each at most `budget` tokens
    (a longer sample goes alone): a seeded permutation cut greedily in order, then split over ranks
    (every rank gets the same number of micro-batches; the tail wraps around)."""
    n = len(lengths)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist() if shuffle else list(range(n))
    batches, cur, used = [], [], 0
    for i in order:
        k = int(lengths[i])
        if k <= 0:
            continue
        if cur and used + k > budget:
            batches.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += k
    if cur:
        batches.append(cur)
    if world > 1 and batches:
        total = math.ceil(len(batches) / world) * world
        batches = (batches * (total // len(batches) + 1))[:total]
    return batches[rank::world]


# ---------------------------------------------------------------- attention

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
        q, k, v = (t[0].transpose(0, 1).to(dtype) for t in (query, key, value))  # [T, H, D]
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
    from ocrtune.models.kernels import replace_forward
    attns = [getattr(blk, "attn", None) for blk in getattr(visual, "blocks", [])]
    patched = [replace_forward(attn, _vision_attention_forward) for attn in attns if hasattr(attn, "qkv")]
    return any(patched)


@functools.lru_cache(maxsize=1)
def install_varlen_sdpa() -> bool:
    """Make transformers' "sdpa" attention honour `cu_seq_lens_q` (packed rows); without those
    kwargs it behaves exactly as before. Returns whether it was installed."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import AttentionInterface
    except ImportError:
        return False

    def sdpa_or_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                          is_causal=is_causal, **kwargs)
        return packed_attention(module, query, key, value, cu, kwargs.get("max_length_q") or query.shape[2], scaling), None

    AttentionInterface.register("sdpa", sdpa_or_varlen)
    return True
