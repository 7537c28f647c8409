"""The runs under the UI's output folder: discovery, status, progress, and the processes it started.

A run started from the page is the real CLI (`python -m ocrtune sft ...`) in a session of its own, so a stop
(SIGTERM to its process group) reaches it and its loader workers alike, and the run saves as it does under
`timeout` or a scheduler. Each launch is a job file (<output_dir>/.webui/jobs/<id>.json: argv, pid and the pid's
start time), so a UI started again still knows its runs; a pid that is not our child is signalled only while
/proc shows the same process (same start time), never a stranger that reused the number.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ocrtune.errors import UserError

STATE_DIR = ".webui"
STOP_CODES = (143, 130, -15, -2)  # SIGTERM / SIGINT exits: the run saved and can resume
RUN_FOLDER = re.compile(r"^run folder: (.+)$", re.M)


@dataclass
class Job:
    id: str
    argv: list
    pid: int
    start_ticks: int | None
    log: str
    started: float
    run_dir: str | None = None
    rc: int | None = None


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def error_line(log: Path) -> str:
    """The run's one-line error (the CLI's `error: ...`), else its last line."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:500]


def read_log(run_dir: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Whole JSON lines of logging.jsonl from byte `offset` -> (records, new offset); a half-written last line waits."""
    try:
        with open(run_dir / "logging.jsonl", "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records, offset + end


def checkpoints(run_dir: Path) -> list[str]:
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return [p.name for p in sorted(found, key=lambda p: int(p.name.split("-")[1]))]


def progress(run_dir: Path, records: list[dict]) -> dict:
    """Step, total, ETA and samples/s from the newest training record."""
    train = [r for r in records if "loss" in r]
    if not train:
        return {}
    last = train[-1]
    step, _, total = str(last.get("global_step/max_steps", "")).partition("/")
    try:
        run_args = json.loads((run_dir / "args.json").read_text())
        per_step = int(run_args.get("batch_size") or 1) * int(run_args.get("gradient_accumulation_steps") or 1)
    except (OSError, ValueError, TypeError):
        per_step = 1
    speed = last.get("train_speed(iter/s)")
    return {"step": int(step) if step.isdigit() else last.get("step"), "max_steps": int(total) if total.isdigit() else None,
            "eta": last.get("remaining_time"), "elapsed": last.get("elapsed_time"),
            "samples_per_s": round(speed * per_step, 3) if isinstance(speed, (int, float)) else None,
            "loss": last.get("loss")}


class Runs:
    def __init__(self, output_dir: Path):
        self.root = output_dir.resolve()
        self.jobs_dir = self.root / STATE_DIR / "jobs"
        (self.root / STATE_DIR).mkdir(parents=True, exist_ok=True)
        self.jobs: dict[str, Job] = {}
        self.children: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self._load()

    # ---- jobs --------------------------------------------------------------------------------
    def _load(self) -> None:
        for path in sorted(self.jobs_dir.glob("*.json")) if self.jobs_dir.is_dir() else ():
            try:
                self.jobs[path.stem] = Job(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue

    def _save(self, job: Job) -> None:
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.jobs_dir / f"{job.id}.json.tmp"
        tmp.write_text(json.dumps(asdict(job)))
        os.replace(tmp, self.jobs_dir / f"{job.id}.json")

    def launch(self, argv: list[str], run_dir: Path | None = None) -> Job:
        """Start `ocrtune <argv>` (an argument list, never a shell line) in a new session; its output goes to a log.
        It runs in the UI's state folder: in the output folder a run's model folder (e.g. tiny/) would shadow
        the preset of the same name."""
        job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        logs = self.root / STATE_DIR / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{job_id}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ocrtune", *argv], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=self.root / STATE_DIR, env=env, start_new_session=True)
        job = Job(job_id, list(argv), proc.pid, proc_start_ticks(proc.pid), str(log), time.time(),
                  str(run_dir.resolve()) if run_dir else None)
        with self.lock:
            self.jobs[job_id], self.children[job_id] = job, proc
            self._save(job)
        threading.Thread(target=self._reap, args=(job, proc), daemon=True).start()
        return job

    def _reap(self, job: Job, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        with self.lock:
            self._find_run_dir(job)
            job.rc = rc
            self._save(job)
            self.children.pop(job.id, None)

    def alive(self, job: Job) -> bool:
        proc = self.children.get(job.id)
        if proc is not None:
            return proc.poll() is None
        return job.rc is None and job.start_ticks is not None and proc_start_ticks(job.pid) == job.start_ticks

    def _find_run_dir(self, job: Job) -> None:
        if job.run_dir is None:
            try:
                m = RUN_FOLDER.search(Path(job.log).read_text(errors="replace").replace("\r", "\n"))
            except OSError:
                m = None
            if m:
                job.run_dir = str(Path(m.group(1).strip()).resolve())
                self._save(job)

    def stop(self, job: Job) -> None:
        """SIGTERM to the job's process group (the run saves its step and exits 143)."""
        if not self.alive(job):
            raise UserError("this run is not running", "reload the page to see its status")
        try:
            os.killpg(job.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    # ---- runs --------------------------------------------------------------------------------
    def run_dirs(self) -> list[Path]:
        found = {p.parent for pattern in ("*/args.json", "*/*/args.json") for p in self.root.glob(pattern)
                 if STATE_DIR not in p.relative_to(self.root).parts and not p.parent.name.startswith("checkpoint-")}
        return sorted((p.resolve() for p in found), key=lambda p: p.stat().st_mtime, reverse=True)

    def rel(self, run_dir: Path) -> str:
        return run_dir.resolve().relative_to(self.root).as_posix()

    def resolve_run(self, run_id: str) -> Path:
        """A run id (its folder relative to the output folder) -> the folder; refused unless it is a run inside."""
        path = (self.root / run_id).resolve()
        if not path.is_relative_to(self.root) or path == self.root or path not in self.run_dirs():
            raise UserError(f"no run '{run_id}' in the output folder", "pick a run from the Runs tab")
        return path

    def latest_job(self, run_dir: Path) -> Job | None:
        with self.lock:
            for job in self.jobs.values():
                self._find_run_dir(job)
            mine = [j for j in self.jobs.values() if j.run_dir and Path(j.run_dir) == run_dir]
        return max(mine, key=lambda j: j.started) if mine else None

    def status(self, run_dir: Path, records: list[dict]) -> tuple[str, str]:
        """(status, error line): running, finished, stopped or failed."""
        job = self.latest_job(run_dir)
        if job is not None:
            if self.alive(job):
                return "running", ""
            if job.rc == 0:
                return "finished", ""
            if job.rc in STOP_CODES or job.rc is None:
                return "stopped", ""
            return "failed", error_line(Path(job.log))
        done = [r for r in records if "global_step/max_steps" in r]
        if done:
            step, _, total = str(done[-1]["global_step/max_steps"]).partition("/")
            return ("finished" if step == total else "stopped"), ""
        return "stopped", ""

    def describe(self, run_dir: Path) -> dict:
        records, _ = read_log(run_dir)
        status, error = self.status(run_dir, records)
        return {"id": self.rel(run_dir), "status": status, "error": error, "progress": progress(run_dir, records),
                "checkpoints": checkpoints(run_dir), "merged": [p.name for p in sorted(run_dir.glob("checkpoint-*-merged"))]}

    def pending(self) -> list[dict]:
        """Launched jobs with no run folder yet: starting, or failed before making one (with their error)."""
        out = []
        with self.lock:
            for job in self.jobs.values():
                self._find_run_dir(job)
                if job.run_dir is None:
                    alive = self.alive(job)
                    if alive or job.rc not in (0, None):
                        out.append({"id": f"job:{job.id}", "status": "starting" if alive else "failed",
                                    "error": "" if alive else error_line(Path(job.log)), "progress": {},
                                    "checkpoints": [], "merged": []})
        return out

    def list(self) -> list[dict]:
        return self.pending() + [self.describe(d) for d in self.run_dirs()]

    def delete(self, run_dir: Path) -> None:
        if self.status(run_dir, read_log(run_dir)[0])[0] == "running":
            raise UserError("this run is still running", "stop it first, then delete it")
        shutil.rmtree(run_dir)
        with self.lock:
            for job in [j for j in self.jobs.values() if j.run_dir and Path(j.run_dir) == run_dir]:
                self.jobs.pop(job.id)
                (self.jobs_dir / f"{job.id}.json").unlink(missing_ok=True)
