"""Canonical rows -> encoded samples -> batches, in a seeded order that a resumed run can replay."""
from __future__ import annotations

import functools
import logging
import math
import random

import torch

from ocrtune.data.checks import check_dataset, text_problem
from ocrtune.data.images import BadImage, image_size, open_image
from ocrtune.data.loading import load_datasets, validation_data
from ocrtune.data.parallel import auto_num_proc, column_list
from ocrtune.data.pixels import join
from ocrtune.models.template import SampleTooLong, Template, collate

log = logging.getLogger("ocrtune")


class EncodedDataset(torch.utils.data.Dataset):
    """Encodes rows on access (in dataloader workers). Rows that fail (too long, bad image under
    check strategy 'none') become None and are skipped by the collator.

    With `cache` (and no augmentation, whose images change every epoch) each row is encoded once:
    image decoding, resizing and patchifying happen once per row, not once per epoch (for benchmarks
    on small data; a training run encodes in its dataloader workers instead, so host memory does not
    grow with the dataset). `lengths()` (the token-budget sampler of `--packing_tokens`) reads only
    image headers and tokenizes text, in parallel over the rows of a `datasets.Dataset`."""

    def __init__(self, rows, template: Template, augment=None, seed: int = 0, cache: bool = False):
        self.rows, self.template, self.augment, self.seed = rows, template, augment, seed
        self.epoch = 0
        self.cache = {} if (cache and augment is None) else None
        self._lengths = None
        self.light_pixels = False  # set in loader workers (`make_loader`): pixels leave them light (one frame, 8 bits)

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
        """Token count of every row, as `encode` would give it (0 for rows that can't be encoded:
        too long, unreadable image header), without decoding pixels."""
        if self._lengths is None:
            self._lengths = row_lengths(self.rows, self.template)
        return self._lengths

    def _encode(self, i: int):
        row = self.rows[i]
        try:
            images = [open_image(r) for r in row["images"]]
            if self.augment is not None:  # seeded by (seed, epoch, row): same images after a resume
                rng = random.Random(hash((self.seed, self.epoch, int(i))))
                images = [self.augment(im, rng) for im in images]
            return self.template.encode(row["messages"], images, light_pixels=self.light_pixels)
        except (SampleTooLong, BadImage, ValueError) as e:
            log.debug("row %d skipped: %s", i, e)
            return None


def _row_length(row: dict, template: Template) -> int:
    if text_problem(row["messages"]):  # never tokenized, whatever --check_dataset_strategy
        return 0
    try:
        n = template.token_count(row["messages"], [image_size(r) for r in row["images"]])
    except (BadImage, ValueError) as e:
        log.debug("row skipped from packing plans: %s", e)
        return 0
    return 0 if template.max_length and n > template.max_length else n


def row_lengths(rows, template: Template, num_proc: int | None = None) -> list[int]:
    """Token counts of `rows` (a list, or a `datasets.Dataset`: then computed with `num_proc`
    processes and cached by `datasets` with the dataset's fingerprint, so a rerun reads them back)."""
    import datasets
    if not isinstance(rows, datasets.Dataset):
        return [_row_length(r, template) for r in rows]
    num_proc = num_proc or auto_num_proc(len(rows))
    out = rows.map(lambda batch: {"_length": [_row_length({"messages": m, "images": i}, template)
                                               for m, i in zip(batch["messages"], batch["images"])]},
                   batched=True, batch_size=1000, num_proc=num_proc, remove_columns=rows.column_names,
                   desc="measuring sample lengths", new_fingerprint=_lengths_fingerprint(rows, template))
    return column_list(out, "_length")


def _lengths_fingerprint(rows, template: Template) -> str:
    """Cache key: the rows, the tokenizer and every setting that changes a length."""
    import hashlib
    ip = template.processor.image_processor
    key = [rows._fingerprint, template.template, template.max_length, template.system, dict(ip.size or {}),
           ip.patch_size, ip.merge_size, len(template.tokenizer), template.tokenizer.name_or_path]
    return hashlib.sha1(repr(key).encode()).hexdigest()[:16]


class Collator:
    """Samples -> one batch (packed or padded), in the dataloader workers. The pixel values are most of a batch's
    bytes (~375 MB in float32 at 65,536 tokens), and making and moving them in the workers (normalizing, casting,
    shared memory, the pinned copy, the host-to-device copy) set the pace of the small model's training, so they
    leave the workers light and the model reads the same values:
    - in workers the dataset encodes each still image as one frame in 8 bits (`data.pixels.make_light`), the batch
      joins them (`data.pixels.join`), and the trainer normalizes them and repeats their frame on the device
      (`data.pixels.to_device`) before the model reads them;
    - a processor that can't give 8 bits sends one normalized frame in `pixel_dtype` (bf16/fp16: the dtype the
      vision tower casts them to anyway).
    Only the loaders' worker processes send the light form (`make_loader` turns it on with workers): a batch made
    in-process is a plain model input, every frame restored and in `pixel_dtype`."""

    def __init__(self, pad_token_id: int, packing: bool = False, pixel_dtype: torch.dtype | None = None,
                 frames: int | None = None, light_pixels: bool = False):
        self.pad_token_id, self.packing, self.pixel_dtype, self.frames = pad_token_id, packing, pixel_dtype, frames
        self.light_pixels = light_pixels

    def for_workers(self) -> "Collator":
        return Collator(self.pad_token_id, self.packing, self.pixel_dtype, self.frames, light_pixels=True)

    def __call__(self, samples):
        samples = [s for s in samples if s is not None]
        if not samples:
            return None
        samples, extra, dtype = join(samples, self.frames, self.pixel_dtype, self.light_pixels)
        if self.packing:
            from ocrtune.data.packing import pack
            batch = pack(samples, self.pad_token_id, pixel_dtype=dtype)
        else:
            batch = collate(samples, self.pad_token_id, pixel_dtype=dtype)
        return {**batch, **extra}


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
        from ocrtune.data.packing import token_budget_batches
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
    ours = isinstance(collator, Collator)
    collator = collator.for_workers() if num_workers and ours else collator
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collator, num_workers=num_workers,
                                       pin_memory=pin_memory, persistent_workers=False,
                                       multiprocessing_context="fork" if num_workers and _can_fork() else None,
                                       prefetch_factor=4 if num_workers else None,
                                       worker_init_fn=functools.partial(_init_worker, light_pixels=ours)
                                       if num_workers else None,
                                       # own generator: creating a loader must not draw from the global RNG,
                                       # or a resumed run's dropout would differ from an uninterrupted one
                                       generator=torch.Generator().manual_seed(0))


def _init_worker(worker_id: int, light_pixels: bool) -> None:
    """A loader worker: SIGTERM ignored (below), and, under our collator (which sends them so, `Collator.for_workers`),
    its copy of the dataset encodes light pixels (one frame, 8 bits); a dataset read in the main process encodes
    plain model inputs."""
    _ignore_sigterm(worker_id)
    info = torch.utils.data.get_worker_info()
    if light_pixels and isinstance(getattr(info, "dataset", None), EncodedDataset):
        info.dataset.light_pixels = True


def _ignore_sigterm(worker_id: int) -> None:
    """Loader workers ignore SIGTERM: a group-wide one (`timeout`, Slurm, torchrun's shutdown) must reach the main
    process, which stops after its step and saves it; a dead worker would fail that step first. (Workers still
    exit when the main process goes: PyTorch's watchdog ends them.)"""
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the main process saves and stops


def _can_fork() -> bool:
    import multiprocessing
    return "fork" in multiprocessing.get_all_start_methods()


# ---------------------------------------------------------------- the run's data builders

def build_data(args, template: Template, accelerator):
    """The default data builder: `args.dataset` (+ validation split) read, checked and encoded."""
    with accelerator.main_process_first():
        train = load_datasets(args.dataset, "train", args.use_hf, args.seed)
        train, val = validation_data(train, args.dataset, args.val_dataset, args.dataset_test_ratio, args.use_hf, args.seed)
        label = ", ".join(args.dataset)
        train = check_dataset(train, args.check_dataset_strategy, label, template=template)
        if val is not None:
            val = check_dataset(val, args.check_dataset_strategy, "validation data", template=template)
    augment = None
    if args.augment:
        from ocrtune.data.augment import augment_printed
        augment = augment_printed
    train_ds = EncodedDataset(train, template, augment, args.seed)
    if args.packing and args.packing_tokens:
        with accelerator.main_process_first():  # rank 0 measures and caches, the others read the cache
            train_ds.lengths()
    return train_ds, (EncodedDataset(val, template) if val is not None else None)


def rows_data(train_rows, val_rows=None, cache: bool = False):
    """A data builder (for `SftRun(args, data=...)`) over rows already in memory, each a dict with
    `images` and `messages`: encoded with the run's template, no checks, no augmentation."""
    def build(args, template: Template, accelerator):
        val = EncodedDataset(val_rows, template, cache=cache) if val_rows is not None else None
        return EncodedDataset(train_rows, template, None, args.seed, cache=cache), val
    return build


def first_good(ds, collator) -> dict | None:
    """The first row of `ds` that encodes, collated as a one-row batch (None if no row does)."""
    for i in range(len(ds)):
        sample = ds[i]
        if sample is not None:
            return collator([sample])
    return None

