"""Canonical rows -> encoded samples -> batches, in a seeded order that a resumed run can replay."""
from __future__ import annotations

import logging
import math
import random

import torch

from ocrtune.data.images import BadImage, open_image
from ocrtune.models.template import SampleTooLong, Template, collate

log = logging.getLogger("ocrtune")


class EncodedDataset(torch.utils.data.Dataset):
    """Encodes rows on access (in dataloader workers). Rows that fail (too long, bad image under
    check strategy 'none') become None and are skipped by the collator.

    With `cache` (and no augmentation, whose images change every epoch) each row is encoded once:
    image decoding, resizing and patchifying happen once per row, not once per epoch. `lengths()`
    (used by the token-budget sampler of `--packing_tokens`) encodes every row up front and turns the
    cache on, filling it before dataloader workers fork, so they share it."""

    def __init__(self, rows, template: Template, augment=None, seed: int = 0, cache: bool = False):
        self.rows, self.template, self.augment, self.seed = rows, template, augment, seed
        self.epoch = 0
        self.cache = {} if (cache and augment is None) else None
        self._lengths = None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i: int):
        i = int(i)
        if self.cache is not None:
            if i not in self.cache:
                self.cache[i] = self._encode(i)
            return self.cache[i]
        return self._encode(i)

    def lengths(self) -> list[int]:
        """Token count of every row (0 for rows that fail to encode)."""
        if self._lengths is None:
            if self.cache is None and self.augment is None:
                self.cache = {}
            self._lengths = [len(s["input_ids"]) if s is not None else 0 for s in (self[i] for i in range(len(self)))]
        return self._lengths

    def _encode(self, i: int):
        row = self.rows[i]
        try:
            images = [open_image(r) for r in row["images"]]
            if self.augment is not None:  # seeded by (seed, epoch, row): same images after a resume
                rng = random.Random(hash((self.seed, self.epoch, int(i))))
                images = [self.augment(im, rng) for im in images]
            return self.template.encode(row["messages"], images)
        except (SampleTooLong, BadImage, ValueError) as e:
            log.debug("row %d skipped: %s", i, e)
            return None


class Collator:
    def __init__(self, pad_token_id: int, packing: bool = False):
        self.pad_token_id, self.packing = pad_token_id, packing

    def __call__(self, samples):
        samples = [s for s in samples if s is not None]
        if not samples:
            return None
        if self.packing:
            from ocrtune.train.packing import pack
            return pack(samples, self.pad_token_id)
        return collate(samples, self.pad_token_id)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                  shuffle: bool = True) -> list[list[int]]:
    """This rank's micro-batches of row indices for one epoch: a seeded permutation, split evenly
    over ranks (the tail that does not fill a global batch wraps around to the start)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist() if shuffle else list(range(n))
    per_global = batch_size * world
    total = math.ceil(n / per_global) * per_global
    order = (order * (total // max(n, 1) + 1))[:total]
    mine = order[rank::world]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def plan_batches(ds: EncodedDataset, args, epoch: int, rank: int = 0, world: int = 1, shuffle: bool = True):
    """Micro-batches for one epoch: `--packing` with `--packing_tokens` cuts the seeded order by a
    token budget (up to `packing_tokens` tokens per packed row); otherwise `batch_size` rows each."""
    if getattr(args, "packing", False) and getattr(args, "packing_tokens", None):
        from ocrtune.train.packing import token_budget_batches
        return token_budget_batches(ds.lengths(), args.packing_tokens, args.seed, epoch, rank, world, shuffle)
    return epoch_batches(len(ds), args.batch_size, args.seed, epoch, rank, world, shuffle)


def parquet_rows(path, limit: int | None = None) -> list[dict]:
    """Canonical rows from a LaTeX_OCR-schema parquet file (image struct, text), without `datasets`."""
    import pyarrow.parquet as pq

    from ocrtune.data.registry import latex_ocr_preprocess
    table = pq.read_table(path, columns=["image", "text"])
    if limit is not None:
        table = table.slice(0, limit)
    return [latex_ocr_preprocess(r) for r in table.to_pylist()]


def make_loader(ds: EncodedDataset, batches: list[list[int]], collator: Collator, num_workers: int, pin_memory: bool):
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collator, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=False,
                                       multiprocessing_context="fork" if num_workers and _can_fork() else None,
                                       prefetch_factor=4 if num_workers else None,
                                       # own generator: creating a loader must not draw from the global RNG,
                                       # or a resumed run's dropout would differ from an uninterrupted one
                                       generator=torch.Generator().manual_seed(0))


def _can_fork() -> bool:
    import multiprocessing
    return "fork" in multiprocessing.get_all_start_methods()
