"""Shared fixtures: one tiny model per test session, built into a temp cache (never the user's)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "latex_ocr"


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


@pytest.fixture
def shared_data():
    if not SHARED.exists():
        pytest.skip("../shared/data/latex_ocr is not present on this machine")
    return SHARED
