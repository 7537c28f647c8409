"""Padding-free packing (the data half): several encoded samples in one row, each with its own positions.

`pack(samples, pad_id)` concatenates samples into a batch of one row and adds
- `position_ids` [4, 1, T]: row 0 the text positions (0..len-1 restarting at each sample, the
  transformers 5 convention for packed rows), rows 1-3 each sample's own M-RoPE (t, h, w) positions,
  computed by `mrope_positions` exactly as Qwen2-VL's `get_rope_index` does for that sample alone;
- `cu_seq_lens` [n+1] (int32) and `max_length`: sample boundaries for variable-length attention.

`token_budget_batches` groups a seeded permutation of samples into micro-batches of at most
`budget` tokens each (the sampler behind `--packing_tokens`).

The attention that keeps packed samples apart (varlen for text and ViT) reaches into transformers and
lives with the other model patches in `ocrtune/models/patches/attention.py`.
"""
from __future__ import annotations

import itertools
import math

import torch

from ocrtune.data.pixels import refuse_light

IGNORE_INDEX = -100  # label of tokens that are not trained on


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

def shared_cat(tensors: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """`torch.cat` along dim 0 (cast to `dtype` in the same pass, if given), written straight into shared memory when
    called in a DataLoader worker (as torch's `default_collate` does): a tensor leaving a worker is otherwise copied
    into shared memory when it is pickled, a second pass over a batch's pixels (~100 MB in bf16 at 65,536 tokens).
    With 2 workers on a 2-core dev machine the loader made 2.31 batches a second of the small model's stage-1 batches
    (bf16 pixels) against 1.97 with a plain cat (bench/learning/loader_shared_memory_dev2cpu.json)."""
    first = tensors[0]
    dtype = dtype or first.dtype
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    if torch.utils.data.get_worker_info() is None:
        out = torch.empty(shape, dtype=dtype, device=first.device)
    else:  # a tensor of `dtype` over a new shared-memory storage
        proto = torch.empty(0, dtype=dtype)
        out = proto.new(proto._typed_storage()._new_shared(math.prod(shape), device=first.device)).view(shape)
    return torch.cat(tensors, out=out)


def pack(samples: list[dict], pad_token_id: int, spatial_merge_size: int = 2,
         pixel_dtype: torch.dtype | None = None) -> dict:
    """One padding-free row from encoded samples (see module docstring). `pad_token_id` is unused
    (nothing is padded) and kept for the collator's signature; `pixel_dtype` casts the pixels as they are joined."""
    del pad_token_id
    ids, labels, types, text_pos, mrope, lens = [], [], [], [], [], []
    for s in samples:
        refuse_light(s, "data.packing.pack")
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
        batch["pixel_values"] = shared_cat([s["pixel_values"] for s in with_images], pixel_dtype)
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
