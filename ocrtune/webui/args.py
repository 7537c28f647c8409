"""Arguments of `ocrtune web-ui` (network flags as `ocrtune serve` spells them)."""
from __future__ import annotations

from dataclasses import dataclass

from ocrtune.args import arg, ints, positive


@dataclass
class WebUiArgs:
    output_dir: str = arg("output", "the folder runs are written to and listed from (the page reads and writes only "
                                    "here and in --upload_dir)")
    upload_dir: str | None = arg(None, "folder the page's dataset and image uploads go to (default: "
                                       "<output_dir>/webui_uploads)")
    host: str = arg("127.0.0.1", "address to listen on; 0.0.0.0 exposes the page to the network (needs --api_key, "
                                 "or a token is generated and printed once)")
    port: int = arg(7860, "TCP port (0 picks a free one and prints it)", domain=ints(0, 65535))
    api_key: str | None = arg(None, "require this token on every /api request (the page asks for it once); or set "
                                    "OCRTUNE_API_KEY", env="OCRTUNE_API_KEY")
    allowed_hosts: list[str] = arg(None, "Host header names the page answers besides localhost and loopback "
                                         "addresses ('*': any); default: loopback names only when listening on "
                                         "loopback, any name otherwise")
    max_upload_mb: float = arg(200.0, "largest uploaded file in MB", domain=positive(65536))
    max_uploads: int = arg(100, "most files the upload folder may hold", domain=ints(1, 100_000))
    header_timeout: float = arg(10.0, "seconds a client has to send a request's headers", domain=positive(3600))
    body_timeout: float = arg(300.0, "seconds a client has to send a request's whole body (uploads)",
                              domain=positive(3600))
    max_connections: int = arg(256, "most open connections (idle ones are closed first to make room)",
                               domain=ints(1, 1_000_000))
    log_level: str = arg("warning", "uvicorn log level: critical, error, warning, info, debug",
                         choices=("critical", "error", "warning", "info", "debug"))
