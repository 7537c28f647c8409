"""Shared fixtures: one tiny model per test session, built into a temp cache (never the user's)."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "latex_ocr"

# One intra-op thread per process, this one and every subprocess and rank it starts (a value given wins): the
# models here are tiny, and a second OpenMP thread mostly spins while tests run processes side by side. Twelve
# steps of test_train's overfit run took 26.6 s of CPU (34.5 s wall) with 2 threads, 2.1 s (3.3 s) with 1, on
# the 2-core machine shared with other jobs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "torch" in sys.modules:  # imported before this file (a plugin): its pool is sized already
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def system_temp_untouched(tmp_path_factory):
    """Tests write under pytest's folders only: TMPDIR (and `tempfile`'s cached choice) points into one for
    the whole session, so torchrun's torchelastic_* folders, `tempfile` users and every subprocess land
    there; at the end, a new entry in the system temp folder (a hard-coded /tmp path) fails the session.
    The check fails the session where the suite has the machine to itself (CI=true, as .ci/run runs, or
    OCRTUNE_TEST_TMP_CHECK=1); elsewhere other jobs may write there meanwhile, so the entries are listed in the
    summary only (OCRTUNE_TEST_TMP_CHECK=0 skips it)."""
    tmp_path_factory.getbasetemp()  # pytest's own folder there (pytest-of-<user>) first
    system = Path(tempfile.gettempdir())
    before, started = set(os.listdir(system)), time.time()
    session_tmp = tmp_path_factory.mktemp("system_tmp")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(session_tmp), str(session_tmp)
    yield session_tmp
    (os.environ.__setitem__("TMPDIR", saved[0]) if saved[0] is not None else os.environ.pop("TMPDIR", None))
    tempfile.tempdir = saved[1]
    left = sorted(name for name in set(os.listdir(system)) - before if _made_since(system / name, started))
    check = os.environ.get("OCRTUNE_TEST_TMP_CHECK", "1" if os.environ.get("CI") else "report")
    if left and check != "0":
        message = (f"the tests left {len(left)} entries in {system}: {', '.join(left[:10])}; write under "
                   "tmp_path (or tempfile, which the session points into pytest's folder) instead")
        if check == "1":
            pytest.fail(message, pytrace=False)
        TEMP_REPORT.append(message + " (or another job on this machine made them: CI=true fails on them)")


TEMP_REPORT: list[str] = []


def pytest_terminal_summary(terminalreporter):
    for line in TEMP_REPORT:
        terminalreporter.write_line(f"WARNING {line}", yellow=True)


def _made_since(path: Path, started: float) -> bool:
    try:
        return path.lstat().st_mtime >= started - 1
    except OSError:  # removed again meanwhile
        return False


@pytest.fixture(scope="session", autouse=True)
def ocrtune_cache(tmp_path_factory):
    cache = os.environ.get("OCRTUNE_TEST_CACHE") or str(tmp_path_factory.mktemp("ocrtune_cache"))
    os.environ["OCRTUNE_CACHE"] = cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return Path(cache)


@pytest.fixture(scope="session")
def tiny_model_dir(ocrtune_cache):
    from ocrtune.models.presets import ensure_preset
    return ensure_preset("tiny")


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    """(model in float32, processor, template) of the tiny model, one load a test module (samples.tiny_parts)."""
    from samples import tiny_parts
    return tiny_parts(tiny_model_dir)


@pytest.fixture
def stops_early(parts):
    """Rows that end early and rows that run to max_new_tokens (samples.stop_early), the same hook for every path."""
    from samples import stop_early
    handle = stop_early(*parts[:2])
    yield
    handle.remove()


@pytest.fixture
def shared_data():
    if not SHARED.exists():
        pytest.skip("../shared/data/latex_ocr is not present on this machine")
    return SHARED
