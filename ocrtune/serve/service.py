"""What the routes of `ocrtune serve` work over: one `Service` per app (the engine behind a batcher, the
CPU-side prompt preparation, the limits and the settings), kept on `app.state.service`."""
from __future__ import annotations

import copy
import hmac
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ocrtune.serve.batching import Batcher
from ocrtune.serve.engine import Engine, check_engine
from ocrtune.serve.fetch import REFUSED, Refused, UrlPolicy, fetch
from ocrtune.serve.protocol import ApiError, ChatRequest, Limits, decode_image

MAX_PROMPT_TOKENS = 8192
log = logging.getLogger("ocrtune.serve")


class Prep:
    """CPU work outside the model thread: image decoding, prompt encoding. Uses its own copy of the
    template (tokenizers must not be shared between threads)."""

    def __init__(self, engine: Engine, max_image_pixels: int):
        try:
            self.template = copy.deepcopy(engine.template)
        except Exception:  # pragma: no cover - a processor that can't be copied: share it under our lock
            self.template = engine.template
        self.lock = threading.Lock()
        self.positions = getattr(engine, "row_positions", None)  # the prompt's M-RoPE positions, made here too
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="ocrtune-prep")
        self.max_image_pixels = max_image_pixels

    def prepare(self, req: ChatRequest) -> dict:
        """Decode the request's images and encode the prompt (token ids + pixels), ready for the engine."""
        images = [self.decode(src) for src in req.images]
        with self.lock:
            try:
                enc = self.template.encode(req.messages, images, add_generation_prompt=True)
            except Exception as e:  # e.g. the image processor refuses an odd shape
                raise ApiError(400, f"the request can't be encoded for the model: {type(e).__name__}: {str(e)[:200]}",
                               "messages") from None
        n = len(enc["input_ids"])
        if n > MAX_PROMPT_TOKENS:
            raise ApiError(400, f"the prompt is {n} tokens long, more than the {MAX_PROMPT_TOKENS} allowed", "messages")
        enc.pop("labels", None)
        if self.positions is not None:
            enc["positions"] = self.positions(enc)
        return enc

    def decode(self, src):
        try:
            return decode_image(src.data, self.max_image_pixels, src.param)
        except ApiError:
            if src.kind == "url":  # what a fetched URL held says something about its host: one message for all
                raise ApiError(400, f"{src.param}: {REFUSED}", src.param, "image_url_refused") from None
            raise


def reserved_tokens(tokenizer) -> tuple[str, ...]:
    try:
        added = list(tokenizer.get_added_vocab().keys())
    except Exception:
        added = []
    return tuple(sorted({t for t in [*added, *getattr(tokenizer, "all_special_tokens", [])] if t.startswith("<|")}))


class Service:
    """The served model and the settings the routes read (`args`: ServeArgs)."""

    def __init__(self, args, engine: Engine, model_name: str):
        check_engine(engine)
        self.args, self.engine, self.model_name = args, engine, model_name
        self.max_body = int(args.max_request_mb * 1024 * 1024)
        self.limits = Limits(max_new_tokens=args.max_new_tokens, max_image_pixels=args.max_image_pixels,
                             allow_image_urls=args.allow_image_urls,
                             reserved_tokens=reserved_tokens(engine.template.tokenizer))
        self.prep = Prep(engine, args.max_image_pixels)
        self.batcher = Batcher(engine, args.max_batch_size, args.batch_wait_ms / 1000.0, args.max_queue,
                               args.continuous_batching)
        self.url_policy = UrlPolicy(args.allowed_image_hosts or ())
        self.started = time.time()

    def start(self) -> None:
        self.batcher.start()

    async def stop(self) -> None:
        await self.batcher.stop()
        self.prep.pool.shutdown(wait=False, cancel_futures=True)

    def check_auth(self, authorization: str | None) -> None:
        key = self.args.api_key
        if not key:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def check_model(self, model_id: str | None, hint: str = "") -> None:
        if model_id is not None and model_id != self.model_name:
            raise ApiError(404, f"model '{model_id}' is not served here; this server serves '{self.model_name}'{hint}",
                           "model", "model_not_found")

    async def fetch_image(self, url: str, param: str) -> bytes:
        try:
            return await fetch(url, self.url_policy, self.max_body, self.args.image_fetch_timeout)
        except Refused as e:  # the reason goes to the log only: the client sees one message for every case
            log.info("image URL refused: %s", e)
            raise ApiError(400, f"{param}: {REFUSED}", param, "image_url_refused") from None

    def health(self) -> dict:
        a = self.args
        return {"status": "ok", "model": self.model_name, "uptime_s": round(time.time() - self.started, 1),
                "auth_required": bool(a.api_key),
                "limits": {"max_new_tokens": a.max_new_tokens, "max_request_bytes": self.max_body,
                           "max_image_pixels": a.max_image_pixels, "max_batch_size": a.max_batch_size,
                           "allow_image_urls": bool(a.allow_image_urls)},
                "batching": self.batcher.snapshot()}

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": int(self.started), "owned_by": "ocrtune"}
