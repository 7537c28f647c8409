"""Image decoding limits and modes: extreme aspect ratios refused before anything is allocated (in
the data path of training and infer, in serve, and for PIL images handed to the template), and
16-bit grayscale scaled rather than clipped."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ocrtune.data.images import BadImage, open_image
from ocrtune.data.registry import SAMPLE_DIR

REPO = Path(__file__).resolve().parents[1]


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_a_300000x1_png_fails_fast_with_little_memory():
    """370 bytes that used to be padded to 300000x2001 (1.8 GB of RGB) before any check: now refused
    from the header. A fresh interpreter measures time and peak RSS of the call alone."""
    code = textwrap.dedent("""
        import io, resource, sys, time
        from PIL import Image
        from ocrtune.data.images import BadImage, open_image
        from ocrtune.serve.protocol import ApiError, decode_image
        buf = io.BytesIO(); Image.new("L", (300000, 1), 0).save(buf, "PNG"); data = buf.getvalue()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.time()
        for call in (lambda: open_image(data), lambda: decode_image(data, 25_000_000)):
            try:
                call()
                sys.exit("accepted")
            except (BadImage, ApiError) as e:
                msg = getattr(e, "message", str(e))
                assert "300000x1" in msg and "200:1" in msg, msg
                if isinstance(e, ApiError):  # a shape the processor refuses, not a large image
                    assert e.code == "invalid_image" and "smaller image" not in msg, (e.code, msg)
        print(len(data), time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr[-2000:]
    size, seconds, grown_kib = r.stdout.split()
    assert int(size) < 1000 and float(seconds) < 1.0
    assert int(grown_kib) < 50 * 1024  # the padded image alone would be 300000 * 2001 * 3 B = 1.8 GB


def test_padding_is_bounded_by_the_pixel_limit_of_the_padded_size():
    """A 190:1 image is padded to 150:1; the limit applies to the padded size, which is larger."""
    im = Image.new("L", (1900, 10), 255)
    assert open_image(png(im)).size == (1900, 1900 // 150 + 1)
    pixels = 1900 * 10  # under a limit of 20000 unpadded, but 1900 x 13 = 24700 once padded
    with pytest.raises(BadImage, match=r"1900x10 = 19000 pixels \(1900x13 = 24700 once padded"):
        open_image(png(im), max_image_pixels=pixels + 1000)


def test_template_refuses_extreme_pil_images_with_a_clear_error(tiny_model_dir):
    from ocrtune.models.loading import load_processor
    from ocrtune.models.template import Template
    t = Template(load_processor(tiny_model_dir))
    with pytest.raises(BadImage, match="aspect ratio over the 200:1"):
        t.encode([{"role": "user", "content": "<image>x"}], [Image.new("RGB", (5000, 10), "white")],
                 add_generation_prompt=True)


def test_16_bit_png_keeps_its_dark_pixels():
    """A real formula image stored as 16-bit grayscale decodes to the same 8-bit pixels (v * 257 /
    257 = v exactly), not clipped to white by PIL's mode conversion."""
    row = pq.read_table(SAMPLE_DIR / "validation.parquet").slice(0, 1).to_pylist()[0]
    gray = np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("L"))
    dark = (gray < 128).mean()
    assert dark > 0.01
    im16 = Image.fromarray(gray.astype(np.uint16) * 257)
    assert im16.mode.startswith("I;16")
    data = png(im16)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # stored and read back as 16-bit
    got = np.asarray(open_image(data).convert("L"))
    assert np.array_equal(got, gray) and (got < 128).mean() == dark
    from ocrtune.serve.protocol import decode_image
    assert np.array_equal(np.asarray(decode_image(data, 10**8).convert("L")), gray)
