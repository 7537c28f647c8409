"""Image references (bytes, local paths, URLs) -> checked RGB PIL images."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image

MAX_IMAGE_PIXELS = 89_478_485  # PIL's decompression-bomb limit: larger images are rejected, not decoded
MAX_ASPECT_RATIO = 150  # Qwen2-VL's resize refuses > 200; wider images are padded to this ratio


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


def _read_bytes(ref: dict, allow_urls: bool = True) -> bytes:
    if ref.get("bytes"):
        return ref["bytes"]
    path = ref.get("path")
    if not path:
        raise BadImage("image has neither bytes nor a path")
    if _is_url(path):
        if not allow_urls:
            raise BadImage(f"image URLs are not allowed here: {path}")
        import urllib.request
        try:
            with urllib.request.urlopen(path, timeout=30) as r:
                return r.read()
        except Exception as e:  # network errors of every kind end the same way for the user
            raise BadImage(f"could not fetch image URL {path}: {e}") from None
    if path.startswith("data:"):
        import base64
        try:
            return base64.b64decode(path.split(",", 1)[1], validate=True)
        except Exception:
            raise BadImage("data URL holds invalid base64") from None
    if not os.path.exists(path):
        raise BadImage(f"image file not found: {path}")
    if os.path.isdir(path):
        raise BadImage(f"image path is a folder, not a file: {path}")
    with open(path, "rb") as f:
        return f.read()


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
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_image_pixels:
                raise BadImage(f"{name} is {w}x{h} = {w * h} pixels, over the {max_image_pixels} limit")
            im.load()  # full decode: catches truncated files that the header check lets through
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(f"{name} is too large to decode safely") from None
    except Exception as e:
        raise BadImage(f"{name} is not a readable image ({type(e).__name__}: {e})") from None
    if w < 1 or h < 1:
        raise BadImage(f"{name} has no pixels")
    return fit_aspect_ratio(im.convert("RGB"))


def fit_aspect_ratio(im: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """Pad very wide or tall images with white so the Qwen2-VL resize accepts them."""
    w, h = im.size
    if max(w, h) / min(w, h) <= max_ratio:
        return im
    nw, nh = (w, max(h, int(w / max_ratio) + 1)) if w > h else (max(w, int(h / max_ratio) + 1), h)
    canvas = Image.new("RGB", (nw, nh), "white")
    canvas.paste(im, (0, 0))
    return canvas


def image_size(ref) -> tuple[int, int]:
    """(width, height) that `open_image` will return for `ref`, read from the file header only
    (no pixel decoding): what length planning for packing needs on a million rows."""
    ref = image_ref(ref)
    data = _read_bytes(ref, allow_urls=False)
    try:
        w, h = Image.open(io.BytesIO(data)).size
    except Exception as e:
        raise BadImage(f"{ref.get('path') or 'image bytes'} is not a readable image ({type(e).__name__}: {e})") from None
    if w < 1 or h < 1:
        raise BadImage(f"{ref.get('path') or 'image bytes'} has no pixels")
    if max(w, h) / min(w, h) > MAX_ASPECT_RATIO:  # open_image pads to the ratio: same arithmetic
        w, h = (w, max(h, int(w / MAX_ASPECT_RATIO) + 1)) if w > h else (max(w, int(h / MAX_ASPECT_RATIO) + 1), h)
    return w, h
