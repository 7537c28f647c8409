"""augment_printed: deterministic per seed, changes pixels, keeps RGB and a similar size; the trainer
applies it only with --augment true."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ocrtune.data.augment import augment_printed


def formula_image(w: int = 240, h: int = 40, mode: str = "L") -> Image.Image:
    """A LaTeX_OCR-like image: dark glyph strokes on white, grayscale like the dataset."""
    im = Image.new(mode, (w, h), 255 if mode == "L" else (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.text((8, h // 4), "x^2 + \\frac{a}{b} = y_1", fill=0 if mode == "L" else (0, 0, 0))
    d.line((4, h - 6, w - 4, h - 6), fill=0 if mode == "L" else (0, 0, 0), width=1)
    return im


def test_deterministic_for_a_seed():
    im = formula_image()
    for seed in range(10):
        a = augment_printed(im, random.Random(seed))
        b = augment_printed(im, random.Random(seed))
        assert a.size == b.size
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_different_seeds_give_different_images():
    im = formula_image()
    outs = {augment_printed(im, random.Random(s)).tobytes() for s in range(10)}
    assert len(outs) > 5


def test_changes_pixels_keeps_rgb_and_similar_size():
    im = formula_image()
    changed = 0
    for seed in range(30):
        out = augment_printed(im, random.Random(seed))
        assert out.mode == "RGB"
        w, h = out.size
        # rescale 0.75..1.3, rotation of at most 2 degrees, margins of at most 12 px a side
        assert 0.7 * im.width <= w <= 1.35 * im.width + 30
        assert 0.7 * im.height <= h <= 1.35 * im.height + 40
        base = np.asarray(im.convert("RGB").resize(out.size))
        if out.size != im.size or not np.array_equal(np.asarray(out), base):
            changed += 1
        # still a formula on paper: mostly light, some dark ink
        arr = np.asarray(out.convert("L"), dtype=np.float32)
        assert arr.mean() > 150 and arr.min() < 150
    assert changed >= 28


def test_input_is_not_modified_and_rgb_input_works():
    im = formula_image(mode="RGB")
    before = im.tobytes()
    out = augment_printed(im, random.Random(3))
    assert im.tobytes() == before
    assert out is not im and out.mode == "RGB"


def test_rng_is_the_only_source_of_randomness():
    im = formula_image()
    random.seed(1)
    np.random.seed(1)
    a = augment_printed(im, random.Random(7))
    random.seed(2)
    np.random.seed(2)
    b = augment_printed(im, random.Random(7))
    assert a.tobytes() == b.tobytes()


def test_small_images_survive():
    for size in ((20, 10), (8, 8), (500, 160)):
        out = augment_printed(formula_image(*size), random.Random(0))
        assert out.mode == "RGB" and min(out.size) >= 6


# ---------------------------------------------------------------- the trainer's use of it

def _rows(n: int = 4):
    rows = []
    for i in range(n):
        buf = io.BytesIO()
        formula_image(200 + 10 * i, 40).save(buf, format="PNG")
        rows.append({"messages": [{"role": "user", "content": "<image>Using LaTeX to perform OCR on the image."},
                                  {"role": "assistant", "content": "x ^ { 2 }"}],
                     "images": [{"bytes": buf.getvalue(), "path": None}]})
    return rows


@pytest.fixture
def template(tiny_model_dir):
    from ocrtune.models.loading import load_processor
    from ocrtune.models.template import Template
    return Template(load_processor(tiny_model_dir), "qwen2_vl", 2048)


def test_augment_false_leaves_images_unchanged(template):
    from ocrtune.data.images import open_image
    from ocrtune.train.data import EncodedDataset
    rows = _rows()
    plain = EncodedDataset(rows, template, None, seed=0)
    for i, row in enumerate(rows):
        expected = template.encode(row["messages"], [open_image(r) for r in row["images"]])
        got = plain[i]
        assert got["input_ids"] == expected["input_ids"]
        assert np.array_equal(got["pixel_values"].numpy(), expected["pixel_values"].numpy())


def test_augment_true_changes_pixels_deterministically(template):
    from ocrtune.train.data import EncodedDataset
    rows = _rows()
    plain = EncodedDataset(rows, template, None, seed=0)
    aug1 = EncodedDataset(rows, template, augment_printed, seed=0)
    aug2 = EncodedDataset(rows, template, augment_printed, seed=0)
    differs = 0
    for i in range(len(rows)):
        a, b, p = aug1[i], aug2[i], plain[i]
        assert np.array_equal(a["pixel_values"].numpy(), b["pixel_values"].numpy())  # same seed, epoch, row
        if a["pixel_values"].shape != p["pixel_values"].shape or not np.array_equal(a["pixel_values"].numpy(), p["pixel_values"].numpy()):
            differs += 1
    assert differs == len(rows)


def test_build_data_uses_augment_flag(tiny_model_dir, tmp_path, template):
    import contextlib

    from ocrtune.data.registry import SAMPLE_DIR
    from ocrtune.train.args import SftArgs
    from ocrtune.train.data import build_data

    class Acc:
        main_process_first = staticmethod(contextlib.nullcontext)

    sample = str(SAMPLE_DIR / "train.parquet") + "#8"
    for flag in (False, True):
        args = SftArgs(dataset=[sample], dataset_test_ratio=0.0, augment=flag)
        train, _ = build_data(args, template, Acc())
        assert (train.augment is augment_printed) if flag else (train.augment is None)
