"""Run many `ocrtune` command lines as separate processes without paying Python's start-up and torch's
import for each: this process imports the CLI's modules once, then forks one child per command line. Each
child gets its own argv, environment, working directory and stdout/stderr files, runs `ocrtune`'s real
entry point (`ocrtune.cli.main.main`) and exits with its status, as `python -m ocrtune ...` would.

    python tests/cli_forks.py cases.json results.json [parallel]

cases.json: [{"argv": [...], "env": {...}, "cwd": "..."}]; results.json: [{"returncode", "stdout", "stderr"}].
"""
from __future__ import annotations

import json
import os
import sys

WARM = ("torch", "transformers", "peft", "accelerate", "datasets", "PIL.Image", "safetensors.torch",
        "ocrtune.cli.main", "ocrtune.train.args", "ocrtune.train.trainer", "ocrtune.data.loading",
        "ocrtune.models.loading", "ocrtune.plot.plots")


def child(case: dict, out_path: str, err_path: str) -> None:
    """In the forked child: become the command line, run it, never return."""
    code = 1
    try:
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(case.get("cwd") or os.getcwd())
        os.environ.clear()
        os.environ.update(case["env"])
        sys.argv = ["ocrtune", *case["argv"]]
        from ocrtune.cli.main import main
        try:
            main(case["argv"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # a crash outside main's handlers shows as a traceback, as it would in a process
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_all(cases: list[dict], parallel: int, tmp: str) -> list[dict]:
    """`tmp`: where the children's stdout/stderr files go (the caller's folder, never the system's)."""
    running, results = {}, [None] * len(cases)
    for i, case in enumerate(cases):
        while len(running) >= parallel:
            pid, status = os.wait()
            collect(running.pop(pid), status, results)
        paths = (os.path.join(tmp, f"{i}.out"), os.path.join(tmp, f"{i}.err"))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(case, *paths)
        running[pid] = (i, *paths)
    while running:
        pid, status = os.wait()
        collect(running.pop(pid), status, results)
    return results


def collect(entry, status, results) -> None:
    i, out_path, err_path = entry
    code = os.waitstatus_to_exitcode(status)
    results[i] = {"returncode": code, "stdout": open(out_path, errors="replace").read(),
                  "stderr": open(err_path, errors="replace").read()}


def main() -> None:
    cases = json.load(open(sys.argv[1]))
    parallel = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    import importlib
    for name in WARM:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module missing only costs its import time in the children
            pass
    outputs = os.path.join(os.path.dirname(os.path.abspath(sys.argv[2])), "cli_forks_outputs")
    os.makedirs(outputs, exist_ok=True)
    json.dump(run_all(cases, parallel, outputs), open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
