"""Atomic folder writes: build in a temporary sibling, then rename into place."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`; an existing `final` is swapped out first and then
    removed, so at every moment one complete folder stands at `final` (or none, before the first)."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
