"""Atomic folder writes: build in a temporary sibling, then rename into place."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
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


MAX_JSON_BYTES = 64 * 2**20  # config and state files are kilobytes; a bigger one is not ours


class UnsafeFile(ValueError):
    """A user-named path that is not a regular file, or is larger than its bound (the message says which)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a special file"


def check_regular(path, max_bytes: int | None = None, what: str = "file", st: os.stat_result | None = None) -> int:
    """The size of `path` (links followed), refusing anything but a regular file (a FIFO blocks a reader for
    ever, /dev/zero never ends) and files over `max_bytes`. OSErrors (missing, permission) pass through."""
    st = os.stat(path) if st is None else st
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(f"{what} {path} is {_kind(st.st_mode)}, not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UnsafeFile(f"{what} {path} is {st.st_size} bytes, over the {max_bytes}-byte limit")
    return st.st_size


def read_bounded(path, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them: checked before opening, opened
    non-blocking (a FIFO swapped in after the check can't block the open), checked again on the open file,
    and read no further than `max_bytes + 1` (a file growing meanwhile is refused, not read whole)."""
    check_regular(path, max_bytes, what)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        check_regular(path, max_bytes, what, st=os.fstat(fd))
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    finally:
        os.close(fd)
    if total > max_bytes:
        raise UnsafeFile(f"{what} {path} is over the {max_bytes}-byte limit")
    return b"".join(chunks)


def read_json(path: Path, fix: str = "restore the file from the run", max_bytes: int = MAX_JSON_BYTES) -> dict:
    """A JSON object from `path` (a regular file of at most `max_bytes`); a damaged file is a one-line error
    with `fix` as its remedy."""
    try:
        data = json.loads(read_bounded(path, max_bytes, "JSON file").decode("utf-8"))
    except UnsafeFile as e:
        raise UserError(str(e), fix) from None
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
