"""`ocrtune serve`: an OpenAI-compatible chat-completions API and a web page over one model.

    POST /v1/chat/completions   messages with image_url parts (base64 data URLs); stream: true -> SSE
    GET  /v1/models             the served model
    GET  /health                status, limits and batching counters
    GET  /                      the web page (static/, KaTeX bundled: works offline)

Safe by default: inline images only (no paths, no URLs unless --allow_image_urls, and then public
addresses only: serve/fetch.py), bounded body size, image pixels, prompt length and max_tokens; every
bad request gets a 4xx JSON error in OpenAI's shape and the server keeps serving. Listens on
127.0.0.1 unless --host says otherwise, and then answers only loopback Host names (serve/hosts.py).
Slow and idle connections are closed at deadlines and can't crowd out real ones (serve/guard.py);
a request whose client hangs up before its answer is dropped from the batch queue.

The routes (serve/routes.py) work over one `Service` (serve/service.py): the `Engine` (serve/engine.py)
behind the batcher (serve/batching.py), prompt preparation and the limits; requests are validated by
serve/protocol.py. This module builds the app and runs it from the command line.
"""
from __future__ import annotations

import socket
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ocrtune.errors import UserError
from ocrtune.serve.engine import Engine
from ocrtune.serve.guard import Guard
from ocrtune.serve.hosts import FrontDoor, HostPolicy, is_loopback
from ocrtune.serve.routes import STATIC, add_error_handlers, router
from ocrtune.serve.service import Service


def create_app(args, engine: Engine, model_name: str, on_ready=None) -> FastAPI:
    """The FastAPI app over a loaded engine (anything that implements `Engine`) for ServeArgs `args`."""
    svc = Service(args, engine, model_name)

    @asynccontextmanager
    async def lifespan(app):
        svc.start()
        if on_ready:
            on_ready()
        yield
        await svc.stop()

    app = FastAPI(title="ocrtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc
    app.add_middleware(FrontDoor, policy=HostPolicy(args.host, args.allowed_hosts))
    add_error_handlers(app)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
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
        (args.header_timeout > 0, "--header_timeout must be positive"),
        (args.body_timeout > 0, "--body_timeout must be positive"),
        (args.image_fetch_timeout > 0, "--image_fetch_timeout must be positive"),
        (args.max_connections >= 1, "--max_connections must be at least 1"),
        (getattr(args, "quant_bits", None) in (None, 4, 8),
         f"--quant_bits {getattr(args, 'quant_bits', None)}: bitsandbytes quantizes to 4 or 8 bits (or drop it)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message, "see `ocrtune serve --help`")


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket on host:port (serve and web-ui), or a one-line error naming the flag to change."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:  # UnicodeError: a name the IDNA codec refuses (empty label, ...)
        raise UserError(f"can't resolve --host {host}: {getattr(e, 'strerror', None) or e}",
                        "use an IP address such as 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise UserError(f"can't listen on {host}:{port}: {e.strerror}",
                        "pick another --port (0 chooses a free one) or stop the program using it") from None
    sock.listen(backlog)
    return sock


def run_serve(args) -> None:
    from ocrtune.serve.loader import default_model_name, load_engine

    validate(args)
    if not is_loopback(args.host) and not args.api_key:
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

    server = make_server(args, create_app(args, engine, name, on_ready=announce))
    server.run(sockets=[sock])


def make_server(args, app):
    """The uvicorn server for an app: h11 under the connection guard (deadlines, idle-first eviction);
    no uvicorn limit_concurrency (it counted idle connections: busy work is bounded by --max_queue)."""
    import uvicorn
    guard = Guard(args.header_timeout, args.body_timeout, args.max_connections)
    config = uvicorn.Config(app, http=guard.protocol(), log_level=args.log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=5, server_header=False)
    return uvicorn.Server(config)
