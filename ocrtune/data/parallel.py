"""How many processes a per-row pass over a dataset (`datasets.map(num_proc=...)`) should use."""
from __future__ import annotations

import os

SERIAL_BELOW = 20_000  # rows: under this, starting worker processes costs more than it saves


def auto_num_proc(n_rows: int) -> int | None:
    """None (one process) for small datasets; else every core this process may use, at most 32."""
    if n_rows < SERIAL_BELOW:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 32)) if cores > 1 else None


def column_list(ds, name: str) -> list:
    """Column `name` of a `datasets.Dataset` as one Python list, in the dataset's row order (its
    indices mapping respected). Indexing or iterating `ds[name]` instead costs a table lookup per
    element: minutes at 400k rows."""
    return ds.with_format("arrow")[name].to_pylist()
