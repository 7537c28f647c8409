"""Atomic folder writes: build in a temporary sibling, then rename into place."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from ocrtune.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: stale temporary folders are left alone
    fcntl = None


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`; an existing `final` is swapped out first and then
    removed, so at every moment one complete folder stands at `final` (or none, before the first)."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _temp_name(final: Path) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(final.name)}-[A-Za-z0-9_]{{8}}$")  # tempfile.mkdtemp's 8-character suffix


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporary folders of `final` left by writers that died (a killed export can leave a
    whole model there). A live writer holds an flock on its folder, so only dead writers' are taken."""
    if fcntl is None or not final.parent.is_dir():
        return []
    removed, pattern = [], _temp_name(final)
    for p in final.parent.iterdir():
        if not (pattern.match(p.name) and p.is_dir()):
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer holds it
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def temp_dir_for(final: Path):
    """A new hidden temporary folder next to `final` (`.<name>-XXXXXXXX`), locked while this process
    writes it; stale ones of the same target are removed first. The caller renames it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    fd = os.open(tmp, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel when the process dies, even by SIGKILL
        yield tmp
    finally:
        os.close(fd)


def read_json(path: Path, fix: str = "restore the file from the run") -> dict:
    """A JSON object from `path`; a damaged file is a one-line error with `fix` as its remedy."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})", fix) from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not valid JSON (not UTF-8 text)", fix) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a JSON object", fix)
    return data


def _real(path) -> Path:
    return Path(path).expanduser().resolve()  # symlinks resolved: two names of one file are one file


def within(path, folder) -> bool:
    """`path` is `folder` or lies somewhere under it (both resolved)."""
    p, f = _real(path), _real(folder)
    return p == f or f in p.parents


def check_not_input(flag: str, output, inputs, *, contains: bool = False, inside: bool = True) -> None:
    """Refuse (UserError) an output that would write over one of the command's own inputs.

    `inputs` are (name, path) pairs; missing paths are skipped. Refused: `output` is an input (same file or
    folder, symlinks resolved); with `inside`, it lies inside an input folder; with `contains` (a folder
    the command fills or replaces), an input lies inside it."""
    out = _real(output)
    for name, path in inputs:
        if path is None or not Path(path).expanduser().exists():
            continue
        src = _real(path)
        if out == src:
            problem = f"{flag} {output} is {name} {path} itself"
        elif inside and src.is_dir() and src in out.parents:
            problem = f"{flag} {output} lies inside {name} {path}"
        elif contains and out in src.parents:
            problem = f"{flag} {output} contains {name} {path}"
        else:
            continue
        raise UserError(f"{problem}, which this command reads; writing there would destroy it",
                        f"choose another {flag}")
