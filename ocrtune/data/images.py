"""Image references (bytes, local paths, URLs) -> checked RGB PIL images."""
from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path

from PIL import Image, ImageOps

from ocrtune.fileio import UnsafeFile, read_bounded

# The one allow-list of formats decoded, for train, infer, eval and serve: never EPS/PS/PDF & co, whose PIL
# plugins hand the bytes to external programs (Ghostscript)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
MAX_IMAGE_BYTES = 128 * 2**20  # an image file or URL response larger than this is refused, not read whole
URL_DEADLINE_S = 60.0  # a URL fetch ends by then, however slowly the bytes trickle in
URL_READ_TIMEOUT_S = 10.0  # and no single read waits longer than this
MAX_IMAGE_PIXELS = 89_478_485  # PIL's decompression-bomb limit: larger images are rejected, not decoded
MAX_ASPECT_RATIO = 150  # images between this and PROCESSOR_ASPECT_RATIO are padded to it (margin for rounding)
PROCESSOR_ASPECT_RATIO = 200  # Qwen2-VL's smart_resize refuses images longer than 200:1; so do we, before decoding


class BadImage(ValueError):
    """An image that cannot be used; the message says why."""


def image_ref(value, base_dir: str | None = None) -> dict:
    """Normalize any image reference to {'bytes': bytes|None, 'path': str|None}."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    elif isinstance(value, (bytes, bytearray)):
        data, path = bytes(value), None
    elif isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        data, path = buf.getvalue(), None
    elif isinstance(value, (str, os.PathLike)):
        data, path = None, str(value)
    else:
        raise BadImage(f"unsupported image value of type {type(value).__name__}")
    if data is None and path and base_dir and not _is_url(path) and not os.path.isabs(path):
        candidate = Path(base_dir) / path
        if candidate.exists():
            path = str(candidate)
    return {"bytes": data, "path": path}


def _is_url(path: str) -> bool:
    return path.startswith(("http://", "https://"))


def fetch_url(url: str, max_bytes: int | None = None, deadline_s: float | None = None) -> bytes:
    """The body of an http(s) URL, streamed: refused when its Content-Length or the bytes received pass
    `max_bytes`, or when the whole fetch takes longer than `deadline_s` (each read waits at most
    URL_READ_TIMEOUT_S, so a trickling server can't stretch it much past the deadline)."""
    import urllib.request
    max_bytes = MAX_IMAGE_BYTES if max_bytes is None else max_bytes
    deadline_s = URL_DEADLINE_S if deadline_s is None else deadline_s
    end = time.monotonic() + deadline_s
    try:
        with urllib.request.urlopen(url, timeout=min(URL_READ_TIMEOUT_S, deadline_s)) as r:
            length = r.headers.get("Content-Length")
            if length and length.strip().isdigit() and int(length) > max_bytes:
                raise BadImage(f"image URL {url} is {int(length)} bytes, over the {max_bytes}-byte limit")
            chunks, total = [], 0
            while True:
                if time.monotonic() > end:
                    raise BadImage(f"image URL {url} took longer than {deadline_s:g} s to fetch")
                chunk = r.read1(min(1 << 16, max_bytes + 1 - total))  # what has come: read() would wait for all of it
                if not chunk:
                    return b"".join(chunks)
                chunks.append(chunk)
                total += len(chunk)
                if total > max_bytes:
                    raise BadImage(f"image URL {url} sent more than the {max_bytes}-byte limit")
    except BadImage:
        raise
    except Exception as e:  # network errors of every kind end the same way for the user
        raise BadImage(f"could not fetch image URL {url}: {e}") from None


def read_image_file(path: str, max_bytes: int | None = None) -> bytes:
    """A local image file's bytes: regular files only, bounded (see `fileio.read_bounded`)."""
    try:
        return read_bounded(path, MAX_IMAGE_BYTES if max_bytes is None else max_bytes, "image file")
    except UnsafeFile as e:
        raise BadImage(str(e)) from None
    except FileNotFoundError:
        raise BadImage(f"image file not found: {path}") from None
    except OSError as e:  # permission denied, I/O errors: the row can't be used, like a missing file
        raise BadImage(f"image file {path} can't be read ({e.strerror or type(e).__name__})") from None


def _read_bytes(ref: dict, allow_urls: bool = True) -> bytes:
    if ref.get("bytes"):
        if len(ref["bytes"]) > MAX_IMAGE_BYTES:
            raise BadImage(f"image bytes are {len(ref['bytes'])} bytes, over the {MAX_IMAGE_BYTES}-byte limit")
        return ref["bytes"]
    path = ref.get("path")
    if not path:
        raise BadImage("image has neither bytes nor a path")
    if _is_url(path):
        if not allow_urls:
            raise BadImage(f"image URLs are not allowed here: {path}")
        return fetch_url(path)
    if path.startswith("data:"):
        import base64
        payload = path.split(",", 1)[-1]
        if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
            raise BadImage(f"data URL is over the {MAX_IMAGE_BYTES}-byte limit")
        try:
            return base64.b64decode(payload, validate=True)
        except Exception:
            raise BadImage("data URL holds invalid base64") from None
    if os.path.isdir(path):
        raise BadImage(f"image path is a folder, not a file: {path}")
    return read_image_file(path)


def open_bytes(data: bytes) -> Image.Image:
    """PIL's lazy open (header only) of `data`, restricted to IMAGE_FORMATS."""
    return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)


def oriented_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) after the EXIF orientation is applied, from the header: orientations 5-8 turn it 90 degrees."""
    w, h = im.size
    return (h, w) if _orientation(im) in (5, 6, 7, 8) else (w, h)


def _orientation(im: Image.Image) -> int | None:
    try:
        return im.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: exif_transpose ignores it too
        return None


def finish_image(im: Image.Image) -> Image.Image:
    """A decoded image as the model sees it, the same for train, infer, eval and serve: turned upright by its
    EXIF orientation (phone photos), RGB (see `to_rgb`), padded to a ratio the processor takes."""
    if _orientation(im) not in (None, 1):  # exif_transpose copies even an upright image: only when it turns
        im = ImageOps.exif_transpose(im)
    return fit_aspect_ratio(to_rgb(im))


def open_image(ref, allow_urls: bool = True, max_image_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image reference to RGB, refusing unreadable, truncated and bomb-sized images."""
    ref = image_ref(ref)
    data = _read_bytes(ref, allow_urls)
    name = ref.get("path") or "image bytes"
    if not data:
        raise BadImage(f"{name} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = open_bytes(data)
            w, h = im.size
            check_size(w, h, max_image_pixels, name)  # from the header: nothing is decoded yet
            im.load()  # full decode: catches truncated files that the header check lets through
            return finish_image(im)
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(f"{name} is too large to decode safely") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"{name} is not a readable image (not one of {', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:
        raise BadImage(f"{name} is not a readable image ({type(e).__name__}: {e})") from None


def padded_size(w: int, h: int, max_ratio: float = MAX_ASPECT_RATIO) -> tuple[int, int]:
    """The size `fit_aspect_ratio` gives a w x h image (what will actually be allocated)."""
    if max(w, h) / min(w, h) <= max_ratio:
        return w, h
    return (w, max(h, int(w / max_ratio) + 1)) if w > h else (max(w, int(h / max_ratio) + 1), h)


def check_size(w: int, h: int, max_pixels: int = MAX_IMAGE_PIXELS, name: str = "image") -> None:
    """Refuse, before anything is decoded or padded, images with no pixels, an aspect ratio the
    Qwen2-VL resize can't take, or more pixels than allowed once padded."""
    if w < 1 or h < 1:
        raise BadImage(f"{name} has no pixels")
    if max(w, h) / min(w, h) > PROCESSOR_ASPECT_RATIO:
        raise BadImage(f"{name} is {w}x{h}, an aspect ratio over the {PROCESSOR_ASPECT_RATIO}:1 that Qwen2-VL's "
                       "image processor accepts; crop it or pad it to a squarer shape")
    pw, ph = padded_size(w, h)
    if pw * ph > max_pixels:
        padded = f" ({pw}x{ph} = {pw * ph} once padded to {MAX_ASPECT_RATIO}:1)" if (pw, ph) != (w, h) else ""
        raise BadImage(f"{name} is {w}x{h} = {w * h} pixels{padded}, over the {max_pixels} limit")


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB with 16/32-bit grayscale scaled to 8 bits (PIL's convert clips it to white) and transparent
    backgrounds made white (formulas are often black on transparent)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        import numpy as np
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        a = np.clip(a, 0, None) * (255.0 / max(top, a.max()))
        im = Image.fromarray(np.rint(a).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, "white")
        canvas.alpha_composite(rgba)
        im = canvas
    return im.convert("RGB")


def fit_aspect_ratio(im: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Pad wide or tall images (up to PROCESSOR_ASPECT_RATIO, see check_size) with white to
    `max_ratio` so the Qwen2-VL resize accepts them."""
    w, h = im.size
    check_size(w, h, max_pixels=2**62)  # callers check pixels; the ratio bound keeps padding within 200/150
    nw, nh = padded_size(w, h, max_ratio)
    if (nw, nh) == (w, h):
        return im
    canvas = Image.new("RGB", (nw, nh), "white")
    canvas.paste(im, (0, 0))
    return canvas


def image_size(ref, max_image_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) that `open_image` will return for `ref`, from the file header only (no pixel
    decoding), with the same checks: what length planning for packing needs on a million rows."""
    ref = image_ref(ref)
    name = ref.get("path") or "image bytes"
    try:
        w, h = oriented_size(open_bytes(_read_bytes(ref)))  # URLs too: the check pass fetched them already
    except BadImage:
        raise
    except Image.UnidentifiedImageError:
        raise BadImage(f"{name} is not a readable image (not one of {', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:
        raise BadImage(f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    check_size(w, h, max_image_pixels, name)
    return padded_size(w, h)
