"""Batching: requests that arrive together are generated together by the one model.

A background asyncio task takes the first waiting request and waits `wait_s` for more. Greedy requests then
decode by continuous batching where the engine can (`ocrtune.models.continuous`): they start as one batch, and
requests arriving while it decodes join it between steps (up to `max_batch_size` rows at once), each answered as
soon as its own row ends. Otherwise (sampling, an engine without it, `continuous=False`) the waiting requests, up
to `max_batch_size`, are grouped by generation settings and each group runs `engine.generate_answers`. Either way
the model runs in a single model thread, so the event loop keeps answering (health checks, uploads, new requests)
while the model works. Streamed requests run one at a time through the same thread. A failing batch is retried
request by request, so one bad input fails only its own request.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ocrtune.serve.engine import Engine

log = logging.getLogger("ocrtune.serve")


_END = object()


class QueueFull(Exception):
    pass


@dataclass
class Job:
    record: dict
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    future: asyncio.Future | None = None  # plain request: resolves to the answer text
    pieces: asyncio.Queue | None = None  # streamed request: receives text pieces, then _END or an exception
    stop: threading.Event | None = None  # streamed request: set when its client is gone
    usage: dict | None = None  # streamed request: the engine fills in tokens and finish_reason at the end
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple:
        return (self.max_new_tokens, self.temperature, self.top_p if self.temperature > 0 else 1.0)

    @property
    def abandoned(self) -> bool:
        """Its client is gone (or it was answered): no reason to generate it."""
        if self.future is not None:
            return self.future.done()
        return self.stop is not None and self.stop.is_set()


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int = 8, wait_s: float = 0.01, max_queue: int = 256,
                 continuous: bool = True):
        self.engine = engine
        self.continuous = _continuous_decoder(engine) if continuous else None
        self.max_batch_size, self.wait_s, self.max_queue = max(1, max_batch_size), max(0.0, wait_s), max_queue
        self.waiting: deque[Job] = deque()  # abandoned jobs are dropped from it, so they hold no place
        self.arrived = asyncio.Event()
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="ocrtune-model")
        self.task: asyncio.Task | None = None
        self.busy = False
        self.stats = {"requests": 0, "streams": 0, "batches": 0, "errors": 0, "max_batch_size_seen": 0,
                      "generate_seconds": 0.0, "continuous": self.continuous is not None}
        self.batch_sizes: Counter = Counter()

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name="ocrtune-batcher")

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        self.model_thread.shutdown(wait=False, cancel_futures=True)

    def snapshot(self) -> dict:
        seen = max(self.stats["max_batch_size_seen"], self.continuous.stats["max_rows"] if self.continuous else 0)
        return {**self.stats, "generate_seconds": round(self.stats["generate_seconds"], 3), "queued": self._live(),
                "max_batch_size_seen": seen,
                "busy": self.busy, "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    # ---- client side ----------------------------------------------------------------------------
    def _live(self) -> int:
        """Jobs waiting whose clients are still there (the abandoned ones are dropped here)."""
        if any(job.abandoned for job in self.waiting):
            self.waiting = deque(job for job in self.waiting if not job.abandoned)
        return len(self.waiting)

    def _put(self, job: Job) -> None:
        if self.task is None or self.task.done():
            raise RuntimeError("the batching worker is not running")
        if self._live() >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are already waiting")
        self.waiting.append(job)
        self.arrived.set()

    async def _next(self) -> Job:
        while not self._live():
            self.arrived.clear()
            await self.arrived.wait()
        return self.waiting.popleft()

    async def generate(self, record: dict, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0):
        """-> an `Answer` (text, tokens, finish_reason). Cancelling the caller (its client left) cancels
        the job: it leaves the queue and is not generated."""
        job = Job(record, max_new_tokens, temperature, top_p, future=asyncio.get_running_loop().create_future())
        self._put(job)
        try:
            return await job.future
        finally:
            if job.future.cancelled():
                self._live()

    async def stream(self, record: dict, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                     stop: threading.Event | None = None, usage: dict | None = None):
        """Async iterator of text pieces; setting `stop` ends generation early (client gone); `usage`
        gets tokens and finish_reason once the pieces end.
        Raises QueueFull at once if the queue is full."""
        job = Job(record, max_new_tokens, temperature, top_p, pieces=asyncio.Queue(), stop=stop or threading.Event(),
                  usage=usage)
        self._put(job)
        return self._drain(job.pieces)

    @staticmethod
    async def _drain(pieces: asyncio.Queue):
        while True:
            item = await pieces.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # ---- worker ---------------------------------------------------------------------------------
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        later: list[Job] = []  # streamed jobs met while collecting a batch
        while True:
            first = later.pop(0) if later else await self._next()
            taken = [first]
            try:
                if first.pieces is not None:
                    await self._run_stream(loop, first)
                    continue
                batch = [first]
                if self.wait_s and self._live() < self.max_batch_size - 1:
                    await asyncio.sleep(self.wait_s)  # let requests sent together arrive
                if self.continuous is not None and first.temperature <= 0:
                    taken = []
                    await self._run_continuous(loop, first, taken)
                    continue
                while len(batch) < self.max_batch_size and self._live():
                    job = self.waiting.popleft()
                    (later if job.pieces is not None else batch).append(job)
                taken = batch
                groups: dict[tuple, list[Job]] = {}
                for job in batch:
                    if not job.abandoned:
                        groups.setdefault(job.key, []).append(job)
                for jobs in groups.values():
                    await self._run_batch(loop, jobs)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug here must not stop the worker: fail these requests only
                log.exception("batching worker error")
                for job in taken:
                    if job.future is not None and not job.future.done():
                        job.future.set_exception(e)
                    elif job.pieces is not None:
                        job.pieces.put_nowait(e)
                        job.pieces.put_nowait(_END)

    async def _run_continuous(self, loop, first: Job, taken: list[Job]) -> None:
        """Greedy requests by continuous batching, from `first` on, until no row is left and no greedy request waits
        (a waiting stream or sampled request ends the session: it gets no new rows, and runs once it ends). `taken`
        holds the jobs handed to the model, for the worker to fail if this breaks."""
        pending = [first]

        async def next_jobs(free: int) -> list:
            out = []
            self._live()  # drops the abandoned
            while len(out) < free:
                if pending:
                    job = pending.pop()
                elif self.waiting and self.waiting[0].pieces is None and self.waiting[0].temperature <= 0:
                    job = self.waiting.popleft()
                else:
                    break
                if not job.abandoned:
                    out.append(job)
            taken.extend(out)
            if out:
                self.stats["batches"] += 1
                self.batch_sizes[len(out)] += 1
            return [(job, job.record, job.max_new_tokens) for job in out]

        def take(free: int) -> list:  # in the model thread
            coroutine = next_jobs(free)
            try:
                return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)
            except Exception:  # the server is stopping
                coroutine.close()
                return []

        def deliver(job: Job, result) -> None:  # in the model thread
            if isinstance(result, BaseException):  # (whole batches log theirs in _generate)
                log.warning("generation failed: %s: %s", type(result).__name__, result)
            loop.call_soon_threadsafe(self._resolve, job, result)

        self.busy = True
        t0 = time.monotonic()
        try:
            await loop.run_in_executor(self.model_thread, self.continuous.run, take, deliver, self.max_batch_size)
        finally:
            self.busy = False
            self.stats["generate_seconds"] += time.monotonic() - t0
        for job in taken:  # a row the decoder never handed back (it broke): fail it rather than leave it waiting
            if job.future is not None and not job.future.done():
                self._resolve(job, RuntimeError("generation ended without an answer"))

    def _resolve(self, job: Job, result) -> None:
        """A plain request's answer (or its error) handed to its caller, unless the caller is gone."""
        self.stats["requests"] += 1
        if job.future.done():
            return
        if isinstance(result, BaseException):
            self.stats["errors"] += 1
            job.future.set_exception(result)
        else:
            job.future.set_result(result)

    async def _run_batch(self, loop, jobs: list[Job]) -> None:
        self.busy = True
        t0 = time.monotonic()
        try:
            results = await loop.run_in_executor(self.model_thread, self._generate, jobs)
        except Exception as e:  # the executor itself failed: fail these requests, keep serving
            results = [e] * len(jobs)
        finally:
            self.busy = False
        self.stats["generate_seconds"] += time.monotonic() - t0
        self.stats["batches"] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], len(jobs))
        self.batch_sizes[len(jobs)] += 1
        for job, res in zip(jobs, results, strict=True):
            self._resolve(job, res)

    def _answers(self, records: list[dict], **kw) -> list:
        return list(self.engine.generate_answers(records, **kw))

    def _generate(self, jobs: list[Job]) -> list:
        """Runs in the model thread."""
        j = jobs[0]
        kw = {"temperature": j.temperature, "top_p": j.top_p}
        try:
            return self._answers([x.record for x in jobs], max_new_tokens=j.max_new_tokens, **kw)
        except Exception as e:
            if len(jobs) == 1:
                log.warning("generation failed: %s: %s", type(e).__name__, e)
                return [e]
        out = []  # find the request that broke the batch; the others still get answers
        for x in jobs:
            try:
                out.append(self._answers([x.record], max_new_tokens=j.max_new_tokens, **kw)[0])
            except Exception as e:
                log.warning("generation failed: %s: %s", type(e).__name__, e)
                out.append(e)
        return out

    async def _run_stream(self, loop, job: Job) -> None:
        put = job.pieces.put_nowait

        if job.stop.is_set():  # the client left while waiting
            put(_END)
            return

        usage = job.usage if job.usage is not None else {}

        def work():
            try:
                for piece in self.engine.stream(job.record, max_new_tokens=job.max_new_tokens, stop=job.stop,
                                                temperature=job.temperature, top_p=job.top_p, usage=usage):
                    if piece:
                        loop.call_soon_threadsafe(put, piece)
                    if job.stop.is_set():
                        break  # closes engine.stream, which ends and joins its generation thread
            except Exception as e:
                log.warning("streamed generation failed: %s: %s", type(e).__name__, e)
                loop.call_soon_threadsafe(put, e)
            finally:
                loop.call_soon_threadsafe(put, _END)

        self.busy = True
        t0 = time.monotonic()
        try:
            await loop.run_in_executor(self.model_thread, work)
        except Exception as e:
            put(e)
        finally:
            self.busy = False
        self.stats["generate_seconds"] += time.monotonic() - t0
        self.stats["streams"] += 1
        self.stats["batches"] += 1
        self.stats["requests"] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], 1)
        self.batch_sizes[1] += 1


def _continuous_decoder(engine):
    """A continuous decoder over `engine` where it can decode that way (an `InferEngine` on a Qwen-VL model without
    unsupported generation settings), else None: its requests then go in whole batches."""
    from ocrtune.models.continuous import ContinuousDecoder, reason
    from ocrtune.models.generate import InferEngine
    if not isinstance(engine, InferEngine):
        return None
    why = reason(engine)
    if why is not None:
        log.info("continuous batching off: %s", why)
        return None
    return ContinuousDecoder(engine)
