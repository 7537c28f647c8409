"""OpenAI chat-completions requests -> checked inference records, and the response shapes.

Everything a client sends is validated here; each problem is an `ApiError` with a status and a
one-line message that names the field, which the app returns in OpenAI's error shape.
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
import warnings
from dataclasses import dataclass

from PIL import Image

from ocrtune.data.images import IMAGE_FORMATS, BadImage, check_size, finish_image, open_bytes
from ocrtune.data.registry import OCR_PROMPT
from ocrtune.models.template import IMAGE_TAG

MAX_MESSAGES = 64
MAX_IMAGES = 8
MAX_TEXT_CHARS = 32_000
ROLES = ("system", "developer", "user", "assistant")
_B64_CHARS = re.compile(rb"^[A-Za-z0-9+/]*={0,2}$")


class ApiError(Exception):
    """A request the server refuses; rendered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "server_busy"}.get(status, "invalid_request_error"
                                                                                   if status < 500 else "server_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ImageSource:
    kind: str  # "data" (inline bytes) or "url" (http/https, only with --allow_image_urls)
    data: bytes | None = None
    url: str | None = None
    param: str = ""


@dataclass
class ChatRequest:
    model: str | None
    messages: list[dict]  # canonical: {"role", "content": str with <image> tags}
    images: list[ImageSource]
    max_tokens: int
    temperature: float
    top_p: float
    stream: bool
    include_usage: bool


@dataclass
class Limits:
    max_new_tokens: int = 512
    max_image_pixels: int = 25_000_000
    allow_image_urls: bool = False
    reserved_tokens: tuple[str, ...] = ()


def check_content_type(content_type: str | None) -> None:
    """JSON bodies only (415 otherwise); a body without a Content-Type is read as JSON, as FastAPI does."""
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        raise ApiError(415, f"Content-Type '{media[:60]}' is not supported; send the body as JSON with "
                            "'Content-Type: application/json'", code="unsupported_media_type")


async def read_body(request, max_body: int, max_request_mb: float) -> bytes:
    """The request body, refused (413) as soon as it is known to be larger than `max_body` bytes."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "bad Content-Length header") from None
        if n > max_body:
            raise ApiError(413, f"request body is {n} bytes, more than the {max_body} allowed "
                                f"(--max_request_mb {max_request_mb:g}); send a smaller image")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_body:
            raise ApiError(413, f"request body is more than the {max_body} bytes allowed "
                                f"(--max_request_mb {max_request_mb:g}); send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> dict:
    if not body or not body.strip():
        raise ApiError(400, "request body is empty; send a JSON object with 'messages'")
    try:
        data = json.loads(body)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"request body must be a JSON object, got {_json_type(data)}")
    return data


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    return "an object"


def _number(body: dict, name: str, default, lo: float, hi: float, lo_open: bool = False, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, got {_json_type(v)}", name)
    # ints are compared as ints: a 400-digit one can't be turned into a float (OverflowError, a 500)
    if (isinstance(v, float) and not math.isfinite(v)) or v < lo or v > hi or (lo_open and v == lo):
        lo_s = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ApiError(400, f"'{name}' is {_shown(v)}; it must be {lo_s} and <= {hi:g}", name)
    return v


def _shown(v) -> str:
    """A number as the client sent it, shortened (a 400-digit one is not echoed whole)."""
    text = repr(v) if isinstance(v, float) else str(v)
    return text if len(text) <= 24 else f"{text[:10]}...({len(text)} digits)"


def parse_chat_request(body: dict, limits: Limits) -> ChatRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, f"'model' must be a string, got {_json_type(model)}", "model")
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        shown = _shown(n) if isinstance(n, (int, float)) else json.dumps(n)[:40]
        raise ApiError(400, f"'n' must be 1 (one answer per request), got {shown}", "n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {_json_type(stream)}", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    include_usage = opts.get("include_usage", False)
    if include_usage is None:
        include_usage = False
    if not isinstance(include_usage, bool):
        raise ApiError(400, f"'stream_options.include_usage' must be true or false, got {_json_type(include_usage)}",
                       "stream_options.include_usage")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, name, limits.max_new_tokens, 1, limits.max_new_tokens, integer=True)
    temperature = float(_number(body, "temperature", 0.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True))
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise ApiError(400, f"'{unsupported}' are not supported by this OCR server", unsupported)
    messages, images = _parse_messages(body.get("messages"), limits)
    return ChatRequest(model, messages, images, int(max_tokens), temperature, top_p, stream, include_usage)


def _parse_messages(messages, limits: Limits) -> tuple[list[dict], list[ImageSource]]:
    if messages is None:
        raise ApiError(400, "'messages' is required: a list of {role, content} objects", "messages")
    if not isinstance(messages, list):
        hint = " (send the array itself, not JSON text)" if isinstance(messages, str) else ""
        raise ApiError(400, f"'messages' must be an array of {{role, content}} objects, got {_json_type(messages)}"
                            f"{hint}", "messages")
    if not messages:
        raise ApiError(400, "'messages' is empty; send at least one user message", "messages")
    if len(messages) > MAX_MESSAGES:
        raise ApiError(400, f"'messages' has {len(messages)} entries, more than the {MAX_MESSAGES} allowed", "messages")
    out, images, chars = [], [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with 'role' and 'content', got {_json_type(m)}", where)
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}", f"{where}.role")
        role = "system" if role == "developer" else role
        content = m.get("content")
        if isinstance(content, str):
            text = _check_text(content, f"{where}.content", limits)
            n_images = 0
        elif isinstance(content, list):
            if not content:
                raise ApiError(400, f"{where}.content is an empty array", f"{where}.content")
            text, n_images = "", 0
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                if not isinstance(part, dict):
                    raise ApiError(400, f"{pwhere} must be an object like {{\"type\": \"text\", \"text\": ...}}, "
                                        f"got {_json_type(part)}", pwhere)
                kind = part.get("type")
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise ApiError(400, f"{pwhere}.text must be a string", f"{pwhere}.text")
                    text += _check_text(part["text"], f"{pwhere}.text", limits)
                elif kind in ("image_url", "input_image"):
                    if role != "user":
                        raise ApiError(400, f"{pwhere}: images are only allowed in user messages", pwhere)
                    images.append(_image_source(part, pwhere, limits))
                    if len(images) > MAX_IMAGES:
                        raise ApiError(400, f"too many images: at most {MAX_IMAGES} per request", pwhere)
                    text += IMAGE_TAG
                    n_images += 1
                else:
                    raise ApiError(400, f"{pwhere}.type must be 'text' or 'image_url', got {json.dumps(kind)[:40]}",
                                   f"{pwhere}.type")
        elif content is None:
            raise ApiError(400, f"{where}.content is required (a string or an array of parts)", f"{where}.content")
        else:
            raise ApiError(400, f"{where}.content must be a string or an array of parts, got {_json_type(content)}",
                           f"{where}.content")
        chars += len(text)
        if chars > MAX_TEXT_CHARS:
            raise ApiError(400, f"message text is longer than {MAX_TEXT_CHARS} characters", where)
        if role == "user" and n_images and not text.replace(IMAGE_TAG, "").strip():
            text += OCR_PROMPT  # an image alone means: read it
        out.append({"role": role, "content": text})
    if out[-1]["role"] != "user":
        raise ApiError(400, f"the last message must come from the user, not '{out[-1]['role']}'", "messages")
    if not any(m["role"] == "user" for m in out):
        raise ApiError(400, "'messages' has no user message", "messages")
    return out, images


def _check_text(text: str, where: str, limits: Limits) -> str:
    if IMAGE_TAG in text:
        raise ApiError(400, f"{where} contains '{IMAGE_TAG}'; send images as image_url parts instead", where)
    for tok in limits.reserved_tokens:
        if tok in text:
            raise ApiError(400, f"{where} contains the reserved token '{tok}'", where)
    if "\x00" in text:
        raise ApiError(400, f"{where} contains a NUL character", where)
    try:  # JSON may carry "\ud800" escapes that are no Unicode text: the tokenizer would fail on them
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{where} contains a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}, "
                            "which is not valid Unicode; send UTF-8 text", where) from None
    return text


def _image_source(part: dict, where: str, limits: Limits) -> ImageSource:
    ref = part.get("image_url")
    if isinstance(ref, dict):
        url = ref.get("url")
    else:
        url = ref
    if url is None:
        raise ApiError(400, f"{where}.image_url.url is required: a data URL such as data:image/png;base64,...",
                       f"{where}.image_url")
    if not isinstance(url, str):
        raise ApiError(400, f"{where}.image_url.url must be a string, got {_json_type(url)}", f"{where}.image_url.url")
    param = f"{where}.image_url.url"
    head = url[:16].lower()
    if head.startswith("data:"):
        return ImageSource("data", data=decode_data_url(url, param), param=param)
    if head.startswith(("http://", "https://")):
        if not limits.allow_image_urls:
            raise ApiError(400, f"{param}: image URLs are not fetched by this server; send the image inline as a "
                                "base64 data URL (data:image/png;base64,...), or start it with --allow_image_urls",
                           param, "image_url_not_allowed")
        return ImageSource("url", url=url, param=param)
    raise ApiError(400, f"{param} must be a base64 data URL (data:image/png;base64,...); "
                        "local file paths and other schemes are never read", param, "unsupported_image_source")


def decode_data_url(url: str, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise ApiError(400, f"{param}: data URL has no ',' before the data", param)
    meta = header[5:].lower().split(";")
    media = meta[0].strip()
    if "base64" not in [s.strip() for s in meta[1:]]:
        raise ApiError(400, f"{param}: data URL must be base64-encoded (data:image/png;base64,...)", param)
    if media and not (media.startswith("image/") or media == "application/octet-stream"):
        raise ApiError(400, f"{param}: data URL media type '{media[:40]}' is not an image", param)
    raw = re.sub(rb"\s+", b"", payload.encode("ascii", "replace"))
    if not raw:
        raise ApiError(400, f"{param}: data URL holds no data", param)
    if not _B64_CHARS.match(raw):
        raise ApiError(400, f"{param}: data URL holds characters that are not base64", param)
    if len(raw.rstrip(b"=")) % 4 == 1 or (raw.endswith(b"=") and len(raw) % 4):
        raise ApiError(400, f"{param}: base64 data is truncated (length {len(raw)} is not a whole number of "
                            "4-character groups)", param, "truncated_base64")
    try:
        return base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"{param}: invalid base64 ({e})", param) from None


def decode_image(data: bytes, max_pixels: int, param: str = "image") -> Image.Image:
    """Bytes -> RGB PIL image; refuses non-images, unsupported formats, truncated files and huge images."""
    if not data:
        raise ApiError(400, f"{param}: image data is empty", param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = open_bytes(data)  # the data path's allow-list (data/images.py: IMAGE_FORMATS)
            w, h = im.size
            try:  # the size that will be allocated (after padding), checked before anything is decoded
                check_size(w, h, max_pixels, "image")
            except BadImage as e:  # too many pixels, or a shape the processor refuses (the message says which)
                too_large = "limit" in str(e)
                raise ApiError(400, f"{param}: {e}" + ("; send a smaller image" if too_large else ""), param,
                               "image_too_large" if too_large else "invalid_image") from None
            im.load()
            return finish_image(im)  # upright by EXIF, RGB, padded: as in training
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(400, f"{param}: image is too large to decode safely", param, "image_too_large") from None
    except Image.UnidentifiedImageError:
        raise ApiError(400, f"{param}: data is not an image in a supported format ({', '.join(IMAGE_FORMATS)})",
                       param, "invalid_image") from None
    except Exception as e:  # truncated or corrupt files, odd modes
        raise ApiError(400, f"{param}: image data is truncated or corrupt ({type(e).__name__}: {str(e)[:120]})",
                       param, "invalid_image") from None


# ---- responses ---------------------------------------------------------------------------------

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def completion_body(cid: str, model: str, text: str, finish: str, usage: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage}


def chunk_body(cid: str, model: str, created: int, delta: dict, finish: str | None = None, usage=None,
               choices: bool = True) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
    if usage is not None:
        body["usage"] = usage
    return body


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else json.dumps(data, ensure_ascii=False).encode()) + b"\n\n"


class Stripper:
    """Feeds stream pieces so that their concatenation equals the whole answer's .strip() (the
    non-streamed text): leading whitespace is dropped, trailing whitespace held back until more text."""

    def __init__(self):
        self.started, self.pending = False, ""

    def feed(self, piece: str) -> str:
        if not self.started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self.started = True
        text = self.pending + piece
        body = text.rstrip()
        self.pending = text[len(body):]
        return body
