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


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 20 10\n%%EndComments\n"
       b"newpath 0 0 moveto 20 10 lineto stroke\nshowpage\n%%EOF\n")


@pytest.mark.parametrize("via", ["bytes", "path"])
def test_eps_named_png_never_reaches_ghostscript(tmp_path, monkeypatch, via):
    """PostScript bytes in a .png: refused as a format outside the allow-list, in training/infer (open_image), in
    the packing sizes (image_size) and in serve (decode_image); PIL's EPS plugin never hands them to Ghostscript."""
    from PIL import EpsImagePlugin

    from ocrtune.data.images import IMAGE_FORMATS, image_size
    from ocrtune.serve.protocol import ApiError, decode_image
    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: calls.append(a) or Image.new("RGB", (20, 10)))
    assert {"EPS", "PDF", "PS"}.isdisjoint(IMAGE_FORMATS)
    path = tmp_path / "formula.png"
    path.write_bytes(EPS)
    ref = EPS if via == "bytes" else str(path)
    for call in (lambda: open_image(ref), lambda: image_size(ref)):
        with pytest.raises(BadImage, match=r"is not a readable image \(not one of PNG, JPEG, WEBP, GIF, BMP, TIFF\)"):
            call()
    with pytest.raises(ApiError, match="not an image in a supported format"):
        decode_image(EPS, 10**8)
    assert calls == []


def exif_jpeg(orientation: int) -> bytes:
    """A 40x20 JPEG, left half black, right half white, tagged with an EXIF orientation."""
    im = Image.new("L", (40, 20), 255)
    im.paste(0, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied_everywhere_and_in_the_header_size():
    """Orientation 6 (a phone held upright: turn 90 degrees clockwise to view): the stored 40x20 image comes out 20x40
    with its left (black) half on top, for training/infer (open_image), serve (decode_image) alike; and image_size,
    read from the header for packing plans, gives the turned size too."""
    from ocrtune.data.images import image_size
    from ocrtune.serve.protocol import decode_image
    data = exif_jpeg(6)
    for im in (open_image(data), decode_image(data, 10**8)):
        a = np.asarray(im.convert("L")).astype(int)
        assert im.size == (20, 40)
        assert a[:18].mean() < 30 and a[22:].mean() > 225  # black on top, white below
    assert image_size(data) == (20, 40)
    assert open_image(exif_jpeg(1)).size == image_size(exif_jpeg(1)) == (40, 20)
