"""Dataset registry: names (SWIFT's --dataset) mapped to hub ids, subsets, splits and a preprocess."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ocrtune.errors import UserError

SAMPLE_DIR = Path(__file__).parent / "sample"
OCR_PROMPT = "Using LaTeX to perform OCR on the image."


def latex_ocr_preprocess(row: dict) -> dict:
    """LaTeX_OCR schema (image, text) -> the canonical messages + images row."""
    return {"messages": [{"role": "user", "content": "<image>" + OCR_PROMPT},
                         {"role": "assistant", "content": row["text"]}],
            "images": [row["image"]]}


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    hf_id: str | None = None
    ms_id: str | None = None
    subsets: tuple[str, ...] = ("default",)
    splits: tuple[str, ...] = ("train",)
    preprocess: Callable[[dict], dict] | None = None
    local_dir: Path | None = None  # bundled data (parquet files named <split>.parquet)
    rows: dict[str, tuple[int, int]] | None = None  # bundled data: the [start, end) rows of each split file it takes
    val_split: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, hf_id: str | None = None, ms_id: str | None = None, subsets=("default",),
                     splits=("train",), preprocess: Callable[[dict], dict] | None = None, **kwargs) -> DatasetSpec:
    """Register a dataset under `name` so `--dataset name` finds it."""
    spec = DatasetSpec(name, hf_id, ms_id, tuple(subsets), tuple(splits), preprocess, **kwargs)
    DATASETS[name] = spec
    return spec


register_dataset("latex-ocr-print", "linxy/LaTeX_OCR", "AI-ModelScope/LaTeX_OCR", subsets=["full"],
                 splits=["train"], preprocess=latex_ocr_preprocess, val_split="validation")
register_dataset("latex-ocr-handwrite", "linxy/LaTeX_OCR", "AI-ModelScope/LaTeX_OCR", subsets=["synthetic_handwrite"],
                 splits=["train"], preprocess=latex_ocr_preprocess, val_split="validation")
register_dataset("latex-ocr-human-handwrite", "linxy/LaTeX_OCR", "AI-ModelScope/LaTeX_OCR",
                 subsets=["human_handwrite"], splits=["train"], preprocess=latex_ocr_preprocess, val_split="validation")
register_dataset("latex-ocr-sample", splits=["train"], preprocess=latex_ocr_preprocess, local_dir=SAMPLE_DIR,
                 val_split="validation")
# the sample's files hold the print rows first, then the handwritten ones (train 192 + 96, validation 24 + 16)
register_dataset("latex-ocr-sample-print", splits=["train"], preprocess=latex_ocr_preprocess, local_dir=SAMPLE_DIR,
                 val_split="validation", rows={"train": (0, 192), "validation": (0, 24)})
register_dataset("latex-ocr-sample-handwrite", splits=["train"], preprocess=latex_ocr_preprocess, local_dir=SAMPLE_DIR,
                 val_split="validation", rows={"train": (192, 288), "validation": (24, 40)})


def get_dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}'",
                        f"use one of {', '.join(sorted(DATASETS))}, or a path to a .jsonl/.json/.csv/.parquet file or a dataset folder")
    return DATASETS[name]
