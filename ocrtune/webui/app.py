"""`ocrtune web-ui`: a local page to fine-tune, watch, stop/resume, evaluate, merge and try runs.

    GET  /                       the page (static/; KaTeX from serve's bundle: works offline)
    GET  /api/meta               the sft flags (from SftArgs: help, defaults, choices, domains), models, datasets
    POST /api/command            {"flags": {...}} -> the equivalent `ocrtune sft ...` line, or the CLI's error
    POST /api/launch             same body: starts that command as a subprocess
    GET  /api/runs               every run under --output_dir with status and progress
    GET  /api/events?run=ID      server-sent events: logging.jsonl records as they are written, status changes
    POST /api/stop|resume|delete {"run": ID}
    POST /api/eval|export|ocr    checkpoint actions (the CLI's eval / export / infer as subprocesses)
    POST /api/upload?name=F      raw body: a dataset file or image into the upload folder

Every path the page names must lie inside --output_dir or the upload folder (or be a registry name or preset).
With a token (--api_key, or generated when listening beyond loopback) every /api request must carry it.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hmac
import json
import re
import secrets
import shlex
import sys
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ocrtune.errors import UserError
from ocrtune.serve.app import bind
from ocrtune.serve.guard import Guard
from ocrtune.serve.hosts import FrontDoor, HostPolicy, is_loopback
from ocrtune.webui.runs import Runs, checkpoints, error_line, read_log

STATIC = Path(__file__).parent / "static"
KATEX = Path(__file__).resolve().parent.parent / "serve" / "static" / "katex"
UNSET = object()
# shown first on the Train tab; the other flags sit under "More flags"
MAIN_FLAGS = ("model", "dataset", "val_dataset", "train_type", "num_train_epochs", "max_steps", "batch_size",
              "gradient_accumulation_steps", "learning_rate", "lora_rank", "lora_alpha", "max_length", "max_pixels",
              "eval_steps", "save_steps", "logging_steps", "predict_with_generate")
UI_OWNED = ("output_dir", "add_output_dir_suffix", "resume_from_checkpoint")  # the page decides these
PATH_FLAGS = ("model", "dataset", "val_dataset")
UPLOAD_TYPES = (".parquet", ".jsonl", ".json", ".csv", ".png", ".jpg", ".jpeg", ".webp", ".bmp")
TASK_TIMEOUT = 3600


class Fail(Exception):
    """A refusal for the page: HTTP status, one line, the field it concerns."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


def field_of(message: str, names) -> str | None:
    m = re.search(r"--(\w+)", message)
    return m.group(1) if m and m.group(1) in names else None


# ---- the sft flags, from their one definition ------------------------------------------------------

def flag_schema() -> list[dict]:
    import typing

    from ocrtune.models.registry import DEFAULT_MODEL, MODELS
    from ocrtune.train.args import SftArgs
    hints = typing.get_type_hints(SftArgs)
    first_run = MODELS[DEFAULT_MODEL].sft_defaults  # what a run of the default model takes where no flag is given
    out = []
    for f in dataclasses.fields(SftArgs):
        if f.name in UI_OWNED:
            continue
        tp = hints[f.name]
        if typing.get_origin(tp) is not list:
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
        kind = "list" if typing.get_origin(tp) is list else getattr(tp, "__name__", "str")
        domain = f.metadata.get("domain")
        out.append({"name": f.name, "type": kind, "default": f.default, "help": f.metadata.get("help", ""),
                    "choices": list(f.metadata["choices"]) if f.metadata.get("choices") else None,
                    "allowed": domain.allowed() if domain else None, "main": f.name in MAIN_FLAGS,
                    "first_run": first_run.get(f.name)})
    out.sort(key=lambda d: (not d["main"], MAIN_FLAGS.index(d["name"]) if d["main"] else 0))
    return out


def flags_to_argv(flags: dict, schema: list[dict]) -> list[str]:
    """The page's form values -> sft flags; fields left empty, or at a default no model overrides, are not passed
    (a flag of the default model's first-run settings is: at the plain default it is a choice against them)."""
    by_name = {d["name"]: d for d in schema}
    argv = []
    for name, raw in flags.items():
        spec = by_name.get(name)
        if spec is None:
            raise Fail(400, f"unknown flag --{name}; pick one the form shows", name)
        value = raw if isinstance(raw, str) else json.dumps(raw) if not isinstance(raw, list) else " ".join(map(str, raw))
        value = value.strip()
        if value == "" or (value == _shown_default(spec["default"]) and spec.get("first_run") is None):
            continue
        if spec["type"] == "list":
            argv += [f"--{name}", *[v for v in re.split(r"[\s,]+", value) if v]]
        else:
            argv += [f"--{name}", value]
    return argv


def _shown_default(default) -> str:
    if isinstance(default, bool):
        return "true" if default else "false"
    return "" if default is None else str(default)


# ---- paths -----------------------------------------------------------------------------------------

class Paths:
    """The folders the UI was started with; everything the page names must resolve inside them."""

    def __init__(self, output_dir: Path, upload_dir: Path):
        self.output, self.uploads = output_dir.resolve(), upload_dir.resolve()

    def inside(self, raw: str, what: str, field: str | None = None) -> Path:
        path = Path(raw).expanduser()
        path = (path if path.is_absolute() else self.output / path).resolve()
        if not any(path.is_relative_to(root) for root in (self.output, self.uploads)):
            raise Fail(403, f"{what} {raw} is outside the folders this page may use; use a registry name, a preset, "
                            f"or a path inside {self.output} or {self.uploads}", field)
        return path

    def model(self, raw: str) -> str:
        from ocrtune.models.registry import MODELS
        return raw if raw in MODELS else str(self.inside(raw, "--model", "model"))

    def dataset(self, raw: str, field: str = "dataset") -> str:
        from ocrtune.data.registry import DATASETS
        name = raw.split("#", 1)[0]
        if name in DATASETS:
            return raw
        count = raw[len(name):]
        return str(self.inside(name, f"--{field}", field)) + count

    def checkpoint(self, runs: Runs, run: str, ckpt: str) -> Path:
        run_dir = runs.resolve_run(run)
        path = (run_dir / ckpt).resolve()
        if path.parent != run_dir or not re.fullmatch(r"checkpoint-\d+(-merged)?", path.name) or not path.is_dir():
            raise Fail(404, f"no checkpoint '{ckpt}' in run {run}; pick one the run lists", "checkpoint")
        return path


def check_paths(argv: list[str], paths: Paths) -> list[str]:
    """sft argv with its model and dataset values checked (and made absolute) against the allowed folders."""
    out, flag = [], None
    for item in argv:
        if item.startswith("--"):
            flag = item[2:]
            out.append(item)
        elif flag == "model":
            out.append(paths.model(item))
        elif flag in ("dataset", "val_dataset"):
            out.append(paths.dataset(item, flag))
        else:
            out.append(item)
    return out


# ---- the app ---------------------------------------------------------------------------------------

def registry_info() -> tuple[list[dict], list[dict]]:
    from ocrtune.data.registry import DATASETS
    from ocrtune.models.registry import MODELS
    models = [{"name": s.name, "source": s.hf_id or f"preset ({s.preset}, built locally)"} for s in MODELS.values()]
    datasets = []
    for d in DATASETS.values():
        rows = None
        if d.local_dir is not None:
            try:
                import pyarrow.parquet as pq
                rows = {split: pq.ParquetFile(p).metadata.num_rows for split in ("train", "validation")
                        for p in [Path(d.local_dir) / f"{split}.parquet"] if p.exists()}
            except Exception:  # a damaged bundle still lists its name
                rows = None
        datasets.append({"name": d.name, "source": d.hf_id or "bundled sample", "rows": rows})
    return models, datasets


def create_app(args, check_sft, token: str | None = None):
    """`check_sft(argv) -> SftArgs` parses and validates sft flags exactly as the CLI does (raises UserError)."""
    output = Path(args.output_dir).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    uploads = Path(args.upload_dir).expanduser() if args.upload_dir else output / "webui_uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    paths = Paths(output, uploads)
    runs = Runs(output)
    schema = flag_schema()
    names = {d["name"] for d in schema}
    app = FastAPI(title="ocrtune web-ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs, app.state.paths = runs, paths

    @app.exception_handler(Fail)
    async def _fail(request, exc: Fail):
        return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status)

    @app.exception_handler(UserError)
    async def _user_error(request, exc: UserError):
        return JSONResponse({"error": str(exc), "field": field_of(str(exc), names)}, status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if token and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or \
                request.query_params.get("token", "")
            if not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"error": "missing or wrong token; enter the token the server printed (or "
                                              "its --api_key)", "field": "token"}, status_code=401)
        return await call_next(request)

    async def body(request: Request) -> dict:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            raise Fail(400, "the request body is not JSON") from None
        if not isinstance(data, dict):
            raise Fail(400, "the request body must be a JSON object")
        return data

    def sft_argv(data: dict) -> list[str]:
        flags = data.get("flags") or {}
        if not isinstance(flags, dict):
            raise Fail(400, "flags must be an object")
        argv = check_paths(flags_to_argv(flags, schema), paths) + ["--output_dir", str(paths.output)]
        check_sft(argv)
        return ["sft", *argv]

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static/katex", StaticFiles(directory=KATEX), name="katex")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/meta")
    async def meta():
        from ocrtune.models.registry import DEFAULT_MODEL
        models, datasets = registry_info()
        files = sorted(p.name for p in uploads.iterdir() if p.is_file())
        return {"flags": schema, "models": models, "datasets": datasets, "default_model": DEFAULT_MODEL,
                "output_dir": str(paths.output),
                "upload_dir": str(paths.uploads), "uploads": files,
                "local_models": [runs.rel(p.parent) for p in paths.output.glob("*/*/checkpoint-*-merged/config.json")]}

    @app.post("/api/command")
    async def command(request: Request):
        return {"command": shlex.join(["ocrtune", *sft_argv(await body(request))])}

    @app.post("/api/launch")
    async def launch(request: Request):
        argv = sft_argv(await body(request))
        job = runs.launch(argv)
        return {"job": job.id, "command": shlex.join(["ocrtune", *argv])}

    @app.get("/api/runs")
    async def list_runs():
        return {"runs": await asyncio.to_thread(runs.list)}

    def run_of(data: dict):
        run = data.get("run")
        if not isinstance(run, str) or not run:
            raise Fail(400, "name a run", "run")
        return run, runs.resolve_run(run)

    @app.post("/api/stop")
    async def stop(request: Request):
        _, run_dir = run_of(await body(request))
        job = runs.latest_job(run_dir)
        if job is None:
            raise Fail(409, "this run was not started from this page; stop it where it runs (Ctrl-C or kill)")
        runs.stop(job)
        return {"ok": True}

    @app.post("/api/resume")
    async def resume(request: Request):
        run, run_dir = run_of(await body(request))
        if runs.status(run_dir, read_log(run_dir)[0])[0] == "running":
            raise Fail(409, "this run is already running")
        ckpts = checkpoints(run_dir)
        if not ckpts:
            raise Fail(409, "this run saved no checkpoint yet; start it again from the Train tab")
        argv = ["sft", "--resume_from_checkpoint", str(run_dir / ckpts[-1]), "--output_dir", str(paths.output)]
        job = runs.launch(argv, run_dir)
        return {"job": job.id, "command": shlex.join(["ocrtune", *argv])}

    @app.post("/api/delete")
    async def delete(request: Request):
        data = await body(request)
        _, run_dir = run_of(data)
        if data.get("confirm") is not True:
            raise Fail(400, "deleting a run needs a confirmation (confirm: true)")
        runs.delete(run_dir)
        return {"ok": True}

    @app.get("/api/events")
    async def events(request: Request, run: str):
        run_dir = runs.resolve_run(run)

        async def stream():
            offset, last, quiet = 0, None, 0.0
            while not await request.is_disconnected():
                records, offset = read_log(run_dir, offset)
                if records:
                    yield f"event: log\ndata: {json.dumps(records)}\n\n"
                if run_dir.exists():
                    info = await asyncio.to_thread(runs.describe, run_dir)
                    if info != last:
                        yield f"event: status\ndata: {json.dumps(info)}\n\n"
                        last = info
                    if info["status"] != "running" and not records:
                        yield "event: end\ndata: {}\n\n"
                        return
                quiet = 0.0 if records else quiet + 0.5
                if quiet >= 15:
                    yield ": keep-alive\n\n"
                    quiet = 0.0
                await asyncio.sleep(0.5)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def cli(argv: list[str]) -> str:
        """Run `ocrtune <argv>` to its end; its stdout, or a Fail with its one-line error."""
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ocrtune", *argv, cwd=str(runs.jobs_dir.parent),
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                    stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), TASK_TIMEOUT)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            proc.kill()
            raise
        if proc.returncode != 0:
            lines = [ln for ln in err.decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
            errors = [ln for ln in lines if ln.startswith("error:")]
            raise Fail(400, (errors or lines or [f"exit status {proc.returncode}"])[-1].removeprefix("error: "))
        return out.decode(errors="replace")

    @app.post("/api/eval")
    async def evaluate(request: Request):
        data = await body(request)
        ckpt = paths.checkpoint(runs, *run_of(data)[:1], str(data.get("checkpoint", "")))
        dataset = paths.dataset(str(data.get("dataset") or "").strip() or "latex-ocr-sample#8")
        limit = str(data.get("max_new_tokens") or 128)
        result = ckpt.parent / "webui_eval" / f"{ckpt.name}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        out = await cli(["eval", "--ckpt_dir", str(ckpt), "--dataset", dataset, "--max_new_tokens", limit,
                         "--result_path", str(result)])
        m = re.search(r"^summary: (.+)$", out, re.M)
        summary = json.loads(Path(m.group(1)).read_text()) if m else {}
        rows = [json.loads(ln) for ln in result.read_text().splitlines()[:20] if ln.strip()] if result.exists() else []
        return {"summary": summary, "rows": [{k: r.get(k) for k in ("index", "reference", "prediction",
                                                                    "bleu4", "edit_distance_char", "exact_match")}
                                              for r in rows]}

    @app.post("/api/export")
    async def export(request: Request):
        data = await body(request)
        ckpt = paths.checkpoint(runs, *run_of(data)[:1], str(data.get("checkpoint", "")))
        out = await cli(["export", "--ckpt_dir", str(ckpt)])
        merged = ckpt.parent / f"{ckpt.name}-merged"
        return {"merged": merged.name if merged.is_dir() else None, "output": out.strip()[-500:]}

    @app.post("/api/ocr")
    async def ocr(request: Request):
        data = await body(request)
        ckpt = paths.checkpoint(runs, *run_of(data)[:1], str(data.get("checkpoint", "")))
        image = image_bytes(data.get("image"), args.max_upload_mb)
        path = paths.uploads / f".ocr-{secrets.token_hex(8)}.img"
        path.write_bytes(image)
        try:
            out = await cli(["infer", "--ckpt_dir", str(ckpt), "--image", str(path),
                             "--max_new_tokens", str(data.get("max_new_tokens") or 256)])
        finally:
            path.unlink(missing_ok=True)
        return {"latex": out.strip()}

    @app.post("/api/upload")
    async def upload(request: Request, name: str):
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(name).name).lstrip(".")
        if not safe or Path(safe).suffix.lower() not in UPLOAD_TYPES:
            raise Fail(400, f"'{name}' is not a dataset file or image; upload one of: {', '.join(UPLOAD_TYPES)}", "upload")
        if sum(1 for p in paths.uploads.iterdir() if p.is_file()) >= args.max_uploads:
            raise Fail(413, f"the upload folder holds {args.max_uploads} files already (--max_uploads); "
                            "delete some from it first", "upload")
        limit = int(args.max_upload_mb * 1e6)
        if int(request.headers.get("content-length") or 0) > limit:
            raise Fail(413, f"the file is over --max_upload_mb {args.max_upload_mb:g}", "upload")
        target, got = paths.uploads / safe, 0
        tmp = target.with_name(f".{safe}.part")
        try:
            with open(tmp, "wb") as f:
                async for chunk in request.stream():
                    got += len(chunk)
                    if got > limit:
                        raise Fail(413, f"the file is over --max_upload_mb {args.max_upload_mb:g}", "upload")
                    f.write(chunk)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
        return {"path": str(target), "name": safe}

    @app.get("/api/log")
    async def job_log(request: Request, run: str):
        run_dir = runs.resolve_run(run)
        job = runs.latest_job(run_dir)
        return {"error": error_line(Path(job.log)) if job else ""}

    return app


def image_bytes(src, max_mb: float) -> bytes:
    if not isinstance(src, str) or not src.startswith("data:image/") or "," not in src:
        raise Fail(400, "send the image as a data:image/... URL", "image")
    try:
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise Fail(400, "the image is not valid base64", "image") from None
    if len(data) > max_mb * 1e6:
        raise Fail(413, f"the image is over --max_upload_mb {max_mb:g}", "image")
    return data


# ---- command line ----------------------------------------------------------------------------------

def run_webui(args, check_sft) -> None:
    import uvicorn

    from ocrtune.args import check_domains
    check_domains(args)
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key is empty", "pass a token, or drop --api_key on 127.0.0.1")
    token = args.api_key
    if not token and not is_loopback(args.host):
        token = secrets.token_urlsafe(24)
        print(f"ocrtune web-ui: listening on {args.host}: every request needs this token (shown once): {token}",
              file=sys.stderr, flush=True)
    sock = bind(args.host, args.port, backlog=512)
    app = FrontDoor(create_app(args, check_sft, token), HostPolicy(args.host, args.allowed_hosts))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    guard = Guard(args.header_timeout, args.body_timeout, args.max_connections)
    config = uvicorn.Config(app, http=guard.protocol(), log_level=args.log_level, timeout_keep_alive=5,
                            timeout_graceful_shutdown=3, server_header=False)
    server = uvicorn.Server(config)
    print(f"ocrtune web-ui: listening on http://{shown}:{port} (runs in {Path(args.output_dir).resolve()})", flush=True)
    server.run(sockets=[sock])
