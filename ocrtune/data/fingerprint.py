"""Cheap fingerprints of the local datasets a run reads, so a resumed run can tell that its data changed on
disk: size, mtime and a hash of the first and last MiB of a file (a folder: names, sizes and mtimes of the
files under it). Registry and hub names have no local file and no fingerprint."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ocrtune.errors import UserError

FINGERPRINT_FILE = "data_fingerprint.json"  # beside a run's args.json
EDGE = 1 << 20  # bytes hashed at each end of a file


def local_path(value: str) -> Path | None:
    """The file or folder a --dataset value names (`name#N` samples N of it), or None for a registry/hub name."""
    for name in (value, value.rpartition("#")[0]):
        if name and Path(name).expanduser().exists():
            return Path(name).expanduser()
    return None


def dataset_paths(values) -> list[tuple[str, Path]]:
    """(--dataset value, its local path) for each value that names a local file or folder."""
    found = ((v, local_path(v)) for v in values or [])
    return [(v, p) for v, p in found if p is not None]


def file_fingerprint(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(EDGE))
        if st.st_size > EDGE:
            f.seek(max(EDGE, st.st_size - EDGE))
            h.update(f.read(EDGE))
    return h.hexdigest()[:32]


def fingerprint(path: Path) -> str:
    """One fingerprint of a file, or of every file under a folder (names, sizes and mtimes only: an image
    folder can be large)."""
    if path.is_file():
        return file_fingerprint(path)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            f = Path(root) / name
            st = f.stat()
            h.update(f"{f.relative_to(path)}\0{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def data_fingerprints(values) -> dict[str, str]:
    """{--dataset value: fingerprint} of the values that name local files or folders."""
    return {v: fingerprint(p) for v, p in dataset_paths(values)}


def write_fingerprints(run_dir: Path, values) -> None:
    (Path(run_dir) / FINGERPRINT_FILE).write_text(json.dumps(data_fingerprints(values), indent=1) + "\n")


def check_unchanged(run_dir: Path, values, allowed: bool) -> None:
    """Refuse (UserError naming the first changed file) data that differs from what the run recorded; a
    run saved without a record, or `allowed` (--allow_data_change true), passes."""
    path = Path(run_dir) / FINGERPRINT_FILE
    if allowed or not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # a damaged record can't tell; the next save writes a new one
    for value, p in dataset_paths(values):
        if value in saved and saved[value] != fingerprint(p):
            raise UserError(f"dataset {p} changed on disk since the run was saved (its size, time or content differ "
                            f"from {path}), so the resumed run would not see the same data in the same order",
                            "restore that file, or pass --allow_data_change true to resume with the data as it is now")
