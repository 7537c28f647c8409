"""Bundled sample rows as canonical records, and PNG files of their images, for the tests."""
from __future__ import annotations

import io
from pathlib import Path

from ocrtune.data.registry import OCR_PROMPT, SAMPLE_DIR


def sample_rows(n: int, split: str = "validation") -> list[dict]:
    import pyarrow.parquet as pq
    t = pq.read_table(SAMPLE_DIR / f"{split}.parquet").slice(0, n).to_pylist()
    return [{"messages": [{"role": "user", "content": "<image>" + OCR_PROMPT}, {"role": "assistant", "content": r["text"]}],
             "images": [{"bytes": r["image"]["bytes"], "path": None}]} for r in t]


def write_png(row: dict, path: Path) -> Path:
    from PIL import Image
    Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB").save(path)
    return path
