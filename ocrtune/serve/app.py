"""`ocrtune serve`: an OpenAI-compatible chat-completions API and a web page over one model.

    POST /v1/chat/completions   messages with image_url parts (base64 data URLs); stream: true -> SSE
    GET  /v1/models             the served model
    GET  /health                status, limits and batching counters
    GET  /                      the web page (static/, KaTeX bundled: works offline)

Safe by default: inline images only (no paths, no URLs unless --allow_image_urls), bounded body
size, image pixels, prompt length and max_tokens; every bad request gets a 4xx JSON error in
OpenAI's shape and the server keeps serving. Listens on 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import asyncio
import copy
import hmac
import ipaddress
import logging
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ocrtune.errors import UserError
from ocrtune.serve.batching import Batcher, QueueFull
from ocrtune.serve.protocol import (ApiError, ChatRequest, Limits, Stripper, check_content_type, chunk_body,
                                    completion_body, completion_id, decode_image, error_body, parse_chat_request,
                                    parse_json, sse, usage_body)

STATIC = Path(__file__).parent / "static"
MAX_PROMPT_TOKENS = 8192
log = logging.getLogger("ocrtune.serve")


class Prep:
    """CPU work outside the model thread: image decoding, prompt token counting. Uses its own copy
    of the template (tokenizers must not be shared between threads)."""

    def __init__(self, engine, max_image_pixels: int):
        try:
            self.template = copy.deepcopy(engine.template)
        except Exception:  # pragma: no cover - a processor that can't be copied: share it under our lock
            self.template = engine.template
        self.tokenizer = self.template.processor.tokenizer
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="ocrtune-prep")
        self.max_image_pixels = max_image_pixels

    def prepare(self, req: ChatRequest) -> dict:
        """Decode the request's images and encode the prompt (token ids + pixels), ready for the engine."""
        images = [decode_image(src.data, self.max_image_pixels, src.param) for src in req.images]
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
        return enc

    def count(self, text: str, max_tokens: int) -> int:
        """Tokens in an answer (re-tokenized, so capped at what generation was allowed)."""
        with self.lock:
            return min(len(self.tokenizer.encode(text, add_special_tokens=False)), max_tokens)


def reserved_tokens(tokenizer) -> tuple[str, ...]:
    try:
        added = list(tokenizer.get_added_vocab().keys())
    except Exception:
        added = []
    return tuple(sorted({t for t in [*added, *getattr(tokenizer, "all_special_tokens", [])] if t.startswith("<|")}))


def create_app(args, engine, model_name: str, on_ready=None):
    """The FastAPI app over a loaded engine (tests may pass any object with generate/stream/template)."""
    max_body = int(args.max_request_mb * 1024 * 1024)
    limits = Limits(max_new_tokens=args.max_new_tokens, max_image_pixels=args.max_image_pixels,
                    allow_image_urls=args.allow_image_urls, reserved_tokens=reserved_tokens(engine.template.tokenizer))
    prep = Prep(engine, args.max_image_pixels)
    batcher = Batcher(engine, args.max_batch_size, args.batch_wait_ms / 1000.0, args.max_queue)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        if on_ready:
            on_ready()
        yield
        await batcher.stop()
        prep.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="ocrtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.model_name = batcher, model_name

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        message = {404: f"no such endpoint: {request.method} {request.url.path}; the API is under /v1 "
                        "(POST /v1/chat/completions, GET /v1/models) and GET /health",
                   405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):  # last resort; the server goes on serving
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["X-Content-Type-Options"] = "nosniff"
        if request.url.path == "/" or request.url.path.startswith("/static"):
            response.headers["Content-Security-Policy"] = (
                "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                "font-src 'self'; connect-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; "
                "frame-ancestors 'none'")
        return response

    def check_auth(request: Request) -> None:
        if not args.api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), args.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                raise ApiError(400, "bad Content-Length header") from None
            if n > max_body:
                raise ApiError(413, f"request body is {n} bytes, more than the {max_body} allowed "
                                    f"(--max_request_mb {args.max_request_mb:g}); send a smaller image")
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_body:
                raise ApiError(413, f"request body is more than the {max_body} bytes allowed "
                                    f"(--max_request_mb {args.max_request_mb:g}); send a smaller image")
            chunks.append(chunk)
        return b"".join(chunks)

    async def fetch_image(url: str, param: str) -> bytes:
        import asyncio

        import httpx

        from ocrtune.data.images import URL_DEADLINE_S
        try:  # a total deadline besides httpx's per-read timeout: a server trickling bytes can't hold a request
            async with asyncio.timeout(URL_DEADLINE_S), \
                    httpx.AsyncClient(timeout=10.0, follow_redirects=True, max_redirects=3) as client:
                async with client.stream("GET", url) as r:
                    if r.status_code != 200:
                        raise ApiError(400, f"{param}: fetching the image URL gave HTTP {r.status_code}", param)
                    length = r.headers.get("content-length", "")
                    if length.isdigit() and int(length) > max_body:  # refused before a byte of the body
                        raise ApiError(400, f"{param}: the image at the URL is {length} bytes, more than the "
                                            f"{max_body} allowed", param)
                    data = bytearray()
                    async for chunk in r.aiter_bytes():
                        data += chunk
                        if len(data) > max_body:
                            raise ApiError(400, f"{param}: the image at the URL is larger than {max_body} bytes", param)
                    return bytes(data)
        except ApiError:
            raise
        except TimeoutError:
            raise ApiError(400, f"{param}: fetching the image URL took longer than {URL_DEADLINE_S:g} s", param) from None
        except Exception as e:
            raise ApiError(400, f"{param}: could not fetch the image URL ({type(e).__name__})", param) from None

    # ---- pages and info ---------------------------------------------------------------------------
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "uptime_s": round(time.time() - started, 1),
                "auth_required": bool(args.api_key),
                "limits": {"max_new_tokens": args.max_new_tokens, "max_request_bytes": max_body,
                           "max_image_pixels": args.max_image_pixels, "max_batch_size": args.max_batch_size,
                           "allow_image_urls": bool(args.allow_image_urls)},
                "batching": batcher.snapshot()}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": int(started), "owned_by": "ocrtune"}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        check_auth(request)
        if model_id != model_name:
            raise ApiError(404, f"model '{model_id}' is not served here; this server serves '{model_name}'",
                           "model", "model_not_found")
        return model_card()

    # ---- completions ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        check_auth(request)
        check_content_type(request.headers.get("content-type"))
        loop = asyncio.get_running_loop()
        body = await read_body(request)
        # parsing a large body (JSON, base64) is CPU work: keep it off the event loop
        req = await loop.run_in_executor(prep.pool, lambda: parse_chat_request(parse_json(body), limits))
        if req.model is not None and req.model != model_name:
            raise ApiError(404, f"model '{req.model}' is not served here; this server serves '{model_name}' "
                                "(see GET /v1/models)", "model", "model_not_found")
        for src in req.images:
            if src.kind == "url":
                src.data = await fetch_image(src.url, src.param)
        prompt = await loop.run_in_executor(prep.pool, prep.prepare, req)
        prompt_tokens = len(prompt["input_ids"])
        cid = completion_id()
        stop = threading.Event()  # set when a streaming client goes away: generation ends early
        usage: dict = {}  # a streamed answer's tokens and finish_reason, filled in when it ends
        try:
            if req.stream:
                pieces = await batcher.stream(prompt, req.max_tokens, req.temperature, req.top_p, stop=stop, usage=usage)
            else:
                answer = await batcher.generate(prompt, req.max_tokens, req.temperature, req.top_p)
        except QueueFull as e:
            raise ApiError(503, f"server busy ({e}); retry shortly", code="server_busy") from None
        except Exception as e:
            log.warning("generation failed: %s", e)
            raise ApiError(500, f"generation failed: {type(e).__name__}: {str(e)[:200]}", type="server_error") from None
        async def tokens_and_finish(text: str, tokens: int | None, finish: str | None) -> tuple[int, str]:
            if tokens is not None:  # counted by the engine from the generated ids
                return tokens, finish
            n = await loop.run_in_executor(prep.pool, prep.count, text, req.max_tokens)  # a text-only engine
            return n, "length" if n >= req.max_tokens else "stop"

        if not req.stream:
            n, finish = await tokens_and_finish(answer.text, answer.tokens, answer.finish_reason)
            return JSONResponse(completion_body(cid, model_name, answer.text, finish, usage_body(prompt_tokens, n)))

        async def events():
            created = int(time.time())
            yield sse(chunk_body(cid, model_name, created, {"role": "assistant", "content": ""}))
            strip, parts = Stripper(), []
            try:
                async for piece in pieces:
                    out = strip.feed(piece)
                    if out:
                        parts.append(out)
                        yield sse(chunk_body(cid, model_name, created, {"content": out}))
            except Exception as e:
                yield sse(error_body(f"generation failed: {type(e).__name__}: {str(e)[:200]}", "server_error"))
                yield sse(b"[DONE]")
                return
            finally:
                stop.set()  # normal end, or the client disconnected (the generator is closed)
            n, finish = await tokens_and_finish("".join(parts), usage.get("tokens"), usage.get("finish_reason"))
            yield sse(chunk_body(cid, model_name, created, {}, finish))
            if req.include_usage:
                yield sse(chunk_body(cid, model_name, created, {}, usage=usage_body(prompt_tokens, n), choices=False))
            yield sse(b"[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---- command line -----------------------------------------------------------------------------------

def validate(args) -> None:
    checks = [
        (0 <= args.port <= 65535, f"--port {args.port} is not a TCP port (0-65535)"),
        (args.max_batch_size >= 1, "--max_batch_size must be at least 1"),
        (args.max_new_tokens >= 1, "--max_new_tokens must be at least 1"),
        (args.max_request_mb > 0, "--max_request_mb must be positive"),
        (args.max_image_pixels >= 1, "--max_image_pixels must be positive"),
        (args.batch_wait_ms >= 0, "--batch_wait_ms can't be negative"),
        (args.max_queue >= 1, "--max_queue must be at least 1"),
        (args.api_key is None or args.api_key.strip() != "", "--api_key is empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message, "see `ocrtune serve --help`")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise UserError(f"can't resolve --host {host}: {e.strerror}", "use an IP address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"can't listen on {host}:{port}: {e.strerror}",
                        "pick another --port (0 chooses a free one) or stop the program using it") from None
    sock.listen(2048)
    return sock


def run_serve(args) -> None:
    import uvicorn

    from ocrtune.serve.loader import default_model_name, load_engine

    validate(args)
    if not _is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach this machine can use "
              "the model", file=sys.stderr)
    sock = bind(args.host, args.port)  # before loading, so a taken port fails fast
    name = default_model_name(args)
    print(f"ocrtune serve: loading {name} ...", file=sys.stderr, flush=True)
    engine, info = load_engine(args)
    if isinstance(info, dict) and info.get("device"):
        what = {"lora": "LoRA checkpoint", "model": "checkpoint", "base": "model"}.get(info.get("kind"), "model")
        print(f"ocrtune serve: loaded the {what} on {info['device']} ({info.get('dtype')})", file=sys.stderr, flush=True)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    def announce():
        print(f"ocrtune serve: model '{name}' listening on http://{shown}:{port} "
              f"(web page at /, API at /v1)", flush=True)

    app = create_app(args, engine, name, on_ready=announce)
    config = uvicorn.Config(app, log_level=args.log_level, limit_concurrency=args.max_queue + 64,
                            timeout_keep_alive=5, timeout_graceful_shutdown=5, server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
