"""Before a hub dataset's first download: is the hub reachable at all? Offline, `datasets` retried each
request five times with back-off (~30 s of retry lines) before failing; one short connect says it at once."""
from __future__ import annotations

import contextlib
import os
import socket
from urllib.parse import urlparse

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
CONNECT_TIMEOUT_S = 3.0


def offline_mode() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE: only cached copies load (the libraries read them at import)."""
    import datasets
    return bool(datasets.config.HF_HUB_OFFLINE)


def endpoint() -> str:
    from huggingface_hub import constants
    return constants.ENDPOINT


def unreachable(url: str | None = None, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why the hub's host takes no connection (`host:port: reason`), or None when it does. Behind a proxy
    the direct connect says nothing, so the library is left to try."""
    if any(os.environ.get(v) for v in PROXY_VARS):
        return None
    parts = urlparse(url or endpoint())
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or type(e).__name__}"
    return None


@contextlib.contextmanager
def offline():
    """Offline mode for one call, as HF_HUB_OFFLINE=1 would give at start-up: a cached copy loads, anything
    else fails at once instead of retrying."""
    import datasets
    from huggingface_hub import constants
    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
