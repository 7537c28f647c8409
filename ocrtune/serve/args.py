"""Arguments of `ocrtune serve` (SWIFT calls it `deploy`)."""
from __future__ import annotations

from dataclasses import dataclass

from ocrtune.args import (arg, ckpt_dir_arg, decode_arg, dtype_arg, ints, max_new_tokens_arg, max_pixels_arg,
                          merge_lora_arg, model_arg, model_type_arg, positive, quant_bits_arg, reals, use_hf_arg)


@dataclass
class ServeArgs:
    # model (same meaning as in `ocrtune infer`)
    ckpt_dir: str | None = ckpt_dir_arg()
    model: str | None = model_arg()
    model_type: str | None = model_type_arg()
    use_hf: bool = use_hf_arg()
    merge_lora: bool = merge_lora_arg()
    dtype: str = dtype_arg()
    quant_bits: int | None = quant_bits_arg("serve the base model in 4 bits (NF4) or 8 by bitsandbytes, with or "
                                            "without an adapter; default: unquantized")
    max_pixels: int | None = max_pixels_arg("images are resized down to at most this many pixels before the model "
                                            "(default: the run's / the model's)")
    served_model_name: str | None = arg(None, "model id clients send and /v1/models lists "
                                              "(default: --model, or <run folder>/<checkpoint-N> for --ckpt_dir)")
    # network
    host: str = arg("127.0.0.1", "address to listen on; 0.0.0.0 exposes the server to the network")
    port: int = arg(8000, "TCP port (0 picks a free one and prints it)", domain=ints(0, 65535))
    api_key: str | None = arg(None, "require 'Authorization: Bearer <key>' on /v1/* (the web page asks for it); "
                                    "or set OCRTUNE_API_KEY",
                              env="OCRTUNE_API_KEY")
    allowed_hosts: list[str] = arg(None, "Host header names the server answers besides localhost and loopback "
                                         "addresses ('*': any); default: loopback names only when listening on "
                                         "loopback, any name otherwise")
    allow_image_urls: bool = arg(False, "also fetch http(s) image URLs named by clients (off: only inline "
                                        "base64 data URLs are accepted; local paths are never read); public "
                                        "addresses only")
    allowed_image_hosts: list[str] = arg(None, "with --allow_image_urls, fetch only from these host names "
                                               "(*.example.com for subdomains) or IP addresses/networks (which may "
                                               "be private, e.g. 10.0.0.0/8)")
    image_fetch_timeout: float = arg(10.0, "seconds one image URL fetch may take in all (redirects included)",
                                     domain=positive(3600))
    # connections
    header_timeout: float = arg(10.0, "seconds a client has to send a request's headers; slower or silent "
                                      "connections are closed", domain=positive(3600))
    body_timeout: float = arg(60.0, "seconds a client has to send a request's whole body once its headers are in",
                              domain=positive(3600))
    max_connections: int = arg(512, "most open connections; at the limit the longest-idle one is closed to make "
                                    "room, and only when all are busy is a new one refused (503)", domain=ints(1, 1_000_000))
    # batching
    max_batch_size: int = arg(8, "most requests generated together in one batch", domain=ints(1, 65536))
    batch_wait_ms: float = arg(10.0, "how long the batcher waits for more requests after the first one arrives",
                               domain=reals(0, 60_000))
    max_queue: int = arg(256, "requests waiting beyond this many are refused with 503", domain=ints(1, 10**7))
    continuous_batching: bool = arg(True, "greedy requests join the batch already decoding, between its steps, and "
                                    "each is answered as soon as its own answer ends (off: whole batches, each "
                                    "answered when its longest answer ends)")
    decode: str = decode_arg()
    # limits
    max_new_tokens: int = max_new_tokens_arg(512, "default and largest max_tokens a request may ask for")
    max_request_mb: float = arg(20.0, "largest request body in MB", domain=positive(65536))
    max_image_pixels: int = arg(25_000_000, "images with more pixels than this are refused (400)", domain=ints(1, 2**31))
    log_level: str = arg("info", "uvicorn log level: critical, error, warning, info, debug",
                         choices=("critical", "error", "warning", "info", "debug"))
