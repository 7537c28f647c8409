"""Make a 2x render look like a LaTeX_OCR print row: heavier strokes, cropped to the ink, padded,
pasted top-left into the smallest fitting bucket, halved with LANCZOS (the im2markup recipe)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

# (width, height) of the print rows, in the order a formula tries them (the first that fits wins).
# Derived from /work/shared/data/latex_ocr/print/train.parquet: its 13,918 images take exactly these
# 17 sizes (none other); they are im2markup's buckets (240x100, 320x80, ... 1000x200) halved, and
# im2markup picks the first bucket in this order that holds the padded formula.
BUCKETS = ((120, 50), (160, 40), (200, 40), (200, 50), (240, 40), (240, 50), (280, 40), (280, 50),
           (320, 40), (320, 50), (360, 40), (360, 50), (360, 60), (360, 100), (400, 50), (400, 160),
           (500, 100))
SCALE = 2          # render at 2x the final resolution, then halve
PAD = 4            # final-resolution pixels of white around the ink (top and left; the bucket adds the rest)
DPI = 87           # effective resolution of the print rows (12pt CM formula heights match at this value)
MARGIN = 8         # 2x pixels of extra white around the padded ink when resampling (> LANCZOS's reach of 6)
INK_THRESHOLD = 250  # a pixel darker than this counts as ink when cropping


def thicken(gray: np.ndarray) -> np.ndarray:
    """2x2 minimum filter: the print rows' strokes carry ~1.45x the ink of a plain render."""
    out = gray.copy()
    out[1:, :] = np.minimum(out[1:, :], gray[:-1, :])
    out[:, 1:] = np.minimum(out[:, 1:], out[:, :-1].copy())
    return out


def ink_box(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """(top, bottom, left, right) of the pixels darker than INK_THRESHOLD, or None for a blank image."""
    rows = np.flatnonzero((gray < INK_THRESHOLD).any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero((gray < INK_THRESHOLD).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def pick_bucket(width: int, height: int) -> tuple[int, int] | None:
    """First bucket (final resolution) that holds a width x height image, None if none does."""
    return next(((w, h) for w, h in BUCKETS if width <= w and height <= h), None)


def style_row(gray2x: np.ndarray) -> tuple[Image.Image | None, str]:
    """A 2x grayscale render -> (final 8-bit grayscale image, "") or (None, why it can't be a row)."""
    gray = thicken(gray2x)
    box = ink_box(gray)
    if box is None:
        return None, "blank"
    top, bottom, left, right = box
    ink = gray[top:bottom, left:right]
    pad = PAD * SCALE
    bucket = pick_bucket((ink.shape[1] + 2 * pad + SCALE - 1) // SCALE, (ink.shape[0] + 2 * pad + SCALE - 1) // SCALE)
    if bucket is None:
        return None, "too large"
    # Only the inked corner of the bucket is resampled: LANCZOS reaches 3 * SCALE source pixels, so with
    # MARGIN more white beyond the padding, the rest of the bucket comes out pure white, as it would in full.
    w = min(bucket[0], (ink.shape[1] + 2 * pad + MARGIN) // SCALE + 1)
    h = min(bucket[1], (ink.shape[0] + 2 * pad + MARGIN) // SCALE + 1)
    corner = Image.new("L", (w * SCALE, h * SCALE), 255)
    corner.paste(Image.fromarray(ink), (pad, pad))
    canvas = Image.new("L", bucket, 255)
    canvas.paste(corner.resize((w, h), Image.LANCZOS), (0, 0))
    return canvas, ""


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
