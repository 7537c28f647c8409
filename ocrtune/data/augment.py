"""Image augmentation for printed / scanned formulas (`ocrtune sft --augment true`).

`augment_printed(image, rng)` returns a new RGB image: a random rescale, a small rotation, a random
white margin, and sometimes blur, a contrast change or sensor noise - what the same formula looks like
when it is printed at another size, scanned slightly askew or photocopied. The strengths are mild on
purpose: LaTeX_OCR print images are small (median 240x40 px), so sub/superscripts must stay readable.
Every random choice comes from `rng` (a `random.Random`), so a seed gives the same image each time;
the trainer seeds it by (seed, epoch, row), which keeps resumed runs identical.
"""
from __future__ import annotations

import random

from PIL import Image, ImageFilter

# (probability, low, high) of each operation
SCALE = (0.8, 0.75, 1.3)        # resize factor of both sides
ROTATE = (0.5, -2.0, 2.0)       # degrees, canvas expanded, filled with the background
PAD = (0.6, 0, 12)              # extra background pixels on each side (drawn per side)
BLUR = (0.3, 0.3, 1.0)          # Gaussian blur radius
CONTRAST = (0.3, 0.7, 1.0)      # pull ink and paper together (faded print)
NOISE = (0.4, 2.0, 12.0)        # std of additive Gaussian noise (0..255 scale)


def _background(im: Image.Image) -> tuple[int, int, int]:
    """The paper colour: the most common colour of the four corners (white for LaTeX_OCR)."""
    w, h = im.size
    corners = [im.getpixel((x, y)) for x in (0, w - 1) for y in (0, h - 1)]
    return max(set(corners), key=corners.count)


def augment_printed(image: Image.Image, rng: random.Random) -> Image.Image:
    """A randomly rescaled, rotated, padded, blurred, faded and noised copy of `image` (RGB out)."""
    im = image.convert("RGB") if image.mode != "RGB" else image.copy()
    bg = _background(im)

    if rng.random() < SCALE[0]:
        f = rng.uniform(SCALE[1], SCALE[2])
        w, h = im.size
        im = im.resize((max(8, round(w * f)), max(8, round(h * f))), Image.Resampling.BICUBIC)

    if rng.random() < ROTATE[0]:
        angle = rng.uniform(ROTATE[1], ROTATE[2])
        im = im.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=bg)

    if rng.random() < PAD[0]:
        left, top, right, bottom = (rng.randint(PAD[1], PAD[2]) for _ in range(4))
        canvas = Image.new("RGB", (im.width + left + right, im.height + top + bottom), bg)
        canvas.paste(im, (left, top))
        im = canvas

    if rng.random() < BLUR[0]:
        im = im.filter(ImageFilter.GaussianBlur(rng.uniform(BLUR[1], BLUR[2])))

    if rng.random() < CONTRAST[0]:
        from PIL import ImageEnhance
        im = ImageEnhance.Contrast(im).enhance(rng.uniform(CONTRAST[1], CONTRAST[2]))

    if rng.random() < NOISE[0]:
        import numpy as np
        std = rng.uniform(NOISE[1], NOISE[2])
        gen = np.random.default_rng(rng.getrandbits(32))
        arr = np.asarray(im, dtype=np.float32)
        # grey noise (same on all channels), like a scanner's
        noise = gen.normal(0.0, std, size=arr.shape[:2])[..., None]
        im = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8), "RGB")

    return im
