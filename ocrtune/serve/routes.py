"""The HTTP surface of `ocrtune serve`: module-level routes and error handlers over the app's `Service`
(`app.state.service`); request shapes and their validation live in `ocrtune.serve.protocol`."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ocrtune.serve.batching import QueueFull
from ocrtune.serve.protocol import (ApiError, ChatRequest, Stripper, check_content_type, chunk_body, completion_body,
                                    completion_id, error_body, parse_chat_request, parse_json, read_body, sse,
                                    usage_body)
from ocrtune.serve.service import Service

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("ocrtune.serve")
router = APIRouter()


def service(request: Request) -> Service:
    return request.app.state.service


def authorized(request: Request, svc: Service = Depends(service)) -> Service:
    svc.check_auth(request.headers.get("authorization"))
    return svc


# ---- pages and info -------------------------------------------------------------------------------

@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def index():
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon():
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


@router.get("/health")
async def health(svc: Service = Depends(service)):
    return svc.health()


@router.get("/v1/models")
async def models(svc: Service = Depends(authorized)):
    return {"object": "list", "data": [svc.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, svc: Service = Depends(authorized)):
    svc.check_model(model_id)
    return svc.model_card()


# ---- completions ----------------------------------------------------------------------------------

@router.post("/v1/chat/completions")
async def chat(request: Request, svc: Service = Depends(authorized)):
    check_content_type(request.headers.get("content-type"))
    loop = asyncio.get_running_loop()
    body = await read_body(request, svc.max_body, svc.args.max_request_mb)
    # parsing a large body (JSON, base64) is CPU work: keep it off the event loop
    req = await loop.run_in_executor(svc.prep.pool, lambda: parse_chat_request(parse_json(body), svc.limits))
    svc.check_model(req.model, " (see GET /v1/models)")
    for src in req.images:
        if src.kind == "url":
            src.data = await svc.fetch_image(src.url, src.param)
    prompt = await loop.run_in_executor(svc.prep.pool, svc.prep.prepare, req)
    if req.stream:
        return await _streamed(svc, req, prompt)
    answer = await _generated(svc, until_disconnect(request, svc.batcher.generate(
        prompt, req.max_tokens, req.temperature, req.top_p)))
    if answer is None:  # the client hung up: its request was dropped, nobody to answer
        return Response(status_code=499)
    usage = usage_body(len(prompt["input_ids"]), answer.tokens)
    return JSONResponse(completion_body(completion_id(), svc.model_name, answer.text, answer.finish_reason, usage))


async def _generated(svc: Service, work):
    """Await the batcher's `work`, turning its failures into API errors."""
    try:
        return await work
    except QueueFull as e:
        raise ApiError(503, f"server busy ({e}); retry shortly", code="server_busy") from None
    except Exception as e:
        log.warning("generation failed: %s", e)
        raise ApiError(500, f"generation failed: {type(e).__name__}: {str(e)[:200]}", type="server_error") from None


async def _streamed(svc: Service, req: ChatRequest, prompt: dict) -> StreamingResponse:
    stop = threading.Event()  # set when a streaming client goes away: generation ends early
    usage: dict = {}  # the answer's tokens and finish_reason, filled in by the engine when it ends
    pieces = await _generated(svc, svc.batcher.stream(prompt, req.max_tokens, req.temperature, req.top_p,
                                                      stop=stop, usage=usage))
    cid, name, prompt_tokens = completion_id(), svc.model_name, len(prompt["input_ids"])

    async def events():
        created = int(time.time())
        yield sse(chunk_body(cid, name, created, {"role": "assistant", "content": ""}))
        strip = Stripper()
        try:
            async for piece in pieces:
                out = strip.feed(piece)
                if out:
                    yield sse(chunk_body(cid, name, created, {"content": out}))
        except Exception as e:
            yield sse(error_body(f"generation failed: {type(e).__name__}: {str(e)[:200]}", "server_error"))
            yield sse(b"[DONE]")
            return
        finally:
            stop.set()  # normal end, or the client disconnected (the generator is closed)
        yield sse(chunk_body(cid, name, created, {}, usage.get("finish_reason")))
        if req.include_usage:
            yield sse(chunk_body(cid, name, created, {}, usage=usage_body(prompt_tokens, usage.get("tokens")),
                                 choices=False))
        yield sse(b"[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def until_disconnect(request: Request, work):
    """Await `work` (a coroutine) unless the client disconnects first: then cancel it and return None."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request itself was cancelled
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


async def _disconnected(request: Request) -> None:
    """Returns once the client is gone (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- errors: every one in OpenAI's shape ----------------------------------------------------------

async def api_error(request, exc: ApiError):
    return JSONResponse(exc.body(), status_code=exc.status)


async def http_error(request, exc):
    message = {404: f"no such endpoint: {request.method} {request.url.path}; the API is under /v1 "
                    "(POST /v1/chat/completions, GET /v1/models) and GET /health",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(message, kind), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def client_gone(request, exc):  # the client left (or was closed at a deadline) mid-request: nobody to answer
    return Response(status_code=400)


async def unexpected(request, exc):  # last resort; the server goes on serving
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)
