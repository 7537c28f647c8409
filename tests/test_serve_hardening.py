"""`ocrtune serve` against hostile or careless clients, on an in-process server (127.0.0.1 only) over a
fake engine and template (no model: each server starts in a fraction of a second):
idle and half-sent connections, slow headers and bodies, image URLs aimed at internal addresses,
foreign Host headers (DNS rebinding), clients that hang up before their answer, out-of-range
numbers and odd request shapes."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import ipaddress
import json
import socket
import socketserver
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from ocrtune.models.generate import Answer
from ocrtune.serve.fetch import REFUSED, CheckedBackend, Refused, UrlPolicy, is_public
from ocrtune.serve.hosts import HostPolicy

URL_PARAM = "messages[0].content[0].image_url.url"


# ---- a fake engine and template: the Engine protocol the server needs --------------------------------

class FakeTokenizer:
    all_special_tokens = ["<|im_end|>"]

    def get_added_vocab(self):
        return {"<|image_pad|>": 1}

    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


class FakeTemplate:
    """Encodes a conversation as its UTF-8 bytes (the prompt text is kept for the engine to read)."""

    def __init__(self):
        self.tokenizer = FakeTokenizer()
        self.processor = SimpleNamespace(tokenizer=self.tokenizer)

    def encode(self, messages, images, add_generation_prompt=True):
        text = " | ".join(m["content"] for m in messages)
        return {"input_ids": list(text.encode()), "text": text, "images": len(images)}


class FakeEngine:  # implements ocrtune.serve.engine.Engine
    """generate_answers: answers 'seen: <prompt>' after `hold` (a threading.Event when set up, else at once);
    stream: `pieces` pieces of 'a ' every `piece_s` seconds until stopped."""

    def __init__(self):
        self.template = FakeTemplate()
        self.seen, self.started, self.hold = [], threading.Event(), None
        self.pieces, self.piece_s, self.streamed = 3, 0.0, 0

    def generate_answers(self, records, max_new_tokens=512, temperature=0.0, top_p=1.0):
        self.seen += [r["text"] for r in records]
        self.started.set()
        if self.hold is not None:
            self.hold.wait(10)
        return [Answer(f"seen {r['text'][:20]}", 3, "stop") for r in records]

    def stream(self, record, max_new_tokens=512, stop=None, usage=None, temperature=0.0, top_p=1.0):
        self.streamed = 0
        for _ in range(self.pieces):
            if stop is not None and stop.is_set():
                return
            time.sleep(self.piece_s)
            self.streamed += 1
            yield "a "
        if usage is not None:
            usage.update(tokens=self.streamed, finish_reason="length" if self.streamed >= max_new_tokens else "stop")


def png_url(size=(40, 20)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, "white").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask_body(text: str = "read", image: str | None = None, **extra) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image or png_url()}}, {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": parts}], **extra}


@contextlib.contextmanager
def serving(engine=None, **overrides):
    """A real uvicorn server (the CLI's make_server) over create_app, on a free 127.0.0.1 port."""
    from ocrtune.serve.app import bind, create_app, make_server
    from ocrtune.serve.args import ServeArgs
    engine = engine or FakeEngine()
    args = ServeArgs(**{"batch_wait_ms": 0, "max_new_tokens": 32, "log_level": "critical", **overrides})
    sock = bind("127.0.0.1", 0)
    server = make_server(args, create_app(args, engine, "fake"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        server.should_exit = True
        thread.join(10)


def open_socket(url: str, data: bytes = b"") -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    if data:
        s.sendall(data)
    return s


def closed_after(s: socket.socket, limit_s: float, drip: bytes | None = None, every: float = 0.1) -> float | None:
    """Seconds until the server closes `s` (sending one byte of `drip` every `every` s), None if it never does."""
    t0 = time.monotonic()
    s.settimeout(every)
    i = 0
    while time.monotonic() - t0 < limit_s:
        try:
            if drip:
                s.sendall(drip[i % len(drip):i % len(drip) + 1])
                i += 1
            while s.recv(4096):  # a response (if any) before the close
                pass
            return time.monotonic() - t0
        except socket.timeout:
            continue
        except OSError:  # reset / broken pipe: closed
            return time.monotonic() - t0
    return None


# ---- idle and slow connections ---------------------------------------------------------------------

HALF_REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


def test_idle_half_requests_do_not_lock_out_health_or_requests():
    """--max_queue 1 with 70 silent half-requests: uvicorn's limit_concurrency (max_queue + 64) counted them
    and answered 503 to everyone; now /health and real requests go through."""
    with serving(max_queue=1) as (url, _):
        idle = [open_socket(url, HALF_REQUEST) for _ in range(70)]
        try:
            time.sleep(0.2)
            r = httpx.get(url + "/health", timeout=5)
            assert r.status_code == 200 and r.json()["status"] == "ok"
            r = httpx.post(url + "/v1/chat/completions", json=ask_body("hello"), timeout=10)
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("seen ")
        finally:
            for s in idle:
                s.close()


def test_at_the_connection_limit_the_oldest_idle_connection_makes_room():
    with serving(max_connections=8) as (url, _):
        idle = [open_socket(url, b"GET /hea") for _ in range(20)]
        try:
            time.sleep(0.2)
            for _ in range(3):
                assert httpx.get(url + "/health", timeout=5).status_code == 200
            # the first sockets (the longest idle) were closed; the newest are still open
            assert closed_after(idle[0], 1.0) is not None
            assert closed_after(idle[-1], 0.3) is None
        finally:
            for s in idle:
                s.close()


def test_slow_headers_silent_sockets_and_slow_bodies_are_closed_at_their_deadlines():
    with serving(header_timeout=0.6, body_timeout=0.8) as (url, _):
        silent = open_socket(url)
        trickle_headers = open_socket(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        body_head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{")
        trickle_body = open_socket(url, body_head)
        try:
            # one byte every 0.1 s never completes the request: closed at the deadline, not kept forever
            t = closed_after(trickle_headers, 4.0, drip=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa")
            assert t is not None and t < 2.5
            t = closed_after(trickle_body, 4.0, drip=b" " * 900)
            assert t is not None and t < 2.5
            assert closed_after(silent, 2.0) is not None
            # a client that sends in time, twice on one kept-alive connection, is served
            with httpx.Client(timeout=5) as client:
                assert client.get(url + "/health").status_code == 200
                time.sleep(0.3)
                assert client.post(url + "/v1/chat/completions", json=ask_body("x")).status_code == 200
        finally:
            for s in (silent, trickle_headers, trickle_body):
                s.close()


# ---- image URLs: no internal addresses, one message for every refusal ------------------------------

class _ImageHandler(http.server.BaseHTTPRequestHandler):
    png = base64.b64decode(png_url().split(",", 1)[1])
    redirect_to = ""

    def do_GET(self):
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        if self.path.startswith("/slow"):
            time.sleep(3)
        body = {"/f.png": self.png, "/big.png": self.png + b"\0" * 300_000, "/slow.png": self.png,
                "/text": b"not an image"}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *a):
        pass


@contextlib.contextmanager
def image_site():
    httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _ImageHandler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def post(url, body, timeout=15, **kw) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout, **kw)


def test_image_urls_to_internal_addresses_are_refused_with_one_message():
    with image_site() as site, serving(allow_image_urls=True) as (url, engine):
        port = site.rsplit(":", 1)[1]
        targets = [site + "/f.png",  # a real image, but on loopback
                   f"http://localhost:{port}/f.png", f"http://[::1]:{port}/f.png",
                   f"http://[::ffff:127.0.0.1]:{port}/f.png", f"http://2130706433:{port}/f.png",
                   f"http://0.0.0.0:{port}/f.png", "http://169.254.169.254/latest/meta-data/",
                   "http://10.0.0.1/x.png", "http://192.168.1.1:8080/x.png", "http://127.0.0.1:1/closed-port.png",
                   "http://nonexistent.invalid/x.png", "https://127.0.0.1:9/x.png"]
        messages = set()
        for target in targets:
            r = post(url, ask_body(image=target))
            assert r.status_code == 400, (target, r.text)
            err = r.json()["error"]
            assert err["code"] == "image_url_refused", (target, err)
            messages.add(err["message"])
        assert messages == {f"{URL_PARAM}: {REFUSED}"}
        assert engine.seen == []


def test_allowed_image_hosts_and_every_redirect_hop_are_checked():
    with image_site() as site, serving(allow_image_urls=True, allowed_image_hosts=["127.0.0.1"],
                                       image_fetch_timeout=1.0, max_request_mb=0.2) as (url, engine):
        r = post(url, ask_body("ok", image=site + "/f.png"))
        assert r.status_code == 200, r.text
        refused = f"{URL_PARAM}: {REFUSED}"
        port = site.rsplit(":", 1)[1]
        # a listed address may redirect to itself, never to a name or address that is not listed
        _ImageHandler.redirect_to = site + "/f.png"
        assert post(url, ask_body("hop", image=site + "/redirect")).status_code == 200
        for hop in (f"http://localhost:{port}/f.png", "http://169.254.169.254/", "file:///etc/passwd"):
            _ImageHandler.redirect_to = hop
            r = post(url, ask_body(image=site + "/redirect"))
            assert (r.status_code, r.json()["error"]["message"]) == (400, refused), hop
        # missing, not an image, too large (byte cap 0.2 MB), too slow (1 s deadline): the same message
        for path in ("/missing.png", "/text", "/big.png", "/slow.png"):
            t0 = time.monotonic()
            r = post(url, ask_body(image=site + path))
            assert (r.status_code, r.json()["error"]["message"]) == (400, refused), path
            assert time.monotonic() - t0 < 2.5
        assert post(url, ask_body(image=f"http://localhost:{port}/f.png")).status_code == 400
        assert len(engine.seen) == 2


def test_url_policy_checks_resolved_addresses_and_connects_to_the_checked_one(monkeypatch):
    for ip in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.0.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
               "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:10.0.0.1", "64:ff9b::a00:1", "240.0.0.1"):
        assert not is_public(ipaddress.ip_address(ip)), ip
    assert is_public(ipaddress.ip_address("93.184.216.34")) and is_public(ipaddress.ip_address("2606:4700::1"))
    policy = UrlPolicy(["img.example.com", "*.cdn.example.org", "10.0.0.0/8"])
    assert policy.host_ok("img.example.com") and policy.host_ok("a.cdn.example.org")
    assert not policy.host_ok("example.com") and not policy.host_ok("evilcdn.example.org")
    assert policy.address_ok("internal", ipaddress.ip_address("10.9.9.9"))
    assert not policy.address_ok("img.example.com", ipaddress.ip_address("127.0.0.1"))

    answers = {"mixed.test": ["93.184.216.34", "127.0.0.1"], "public.test": ["93.184.216.34"]}

    async def fake_getaddrinfo(host, port, **kw):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in answers[host]]

    class Recorder:
        async def connect_tcp(self, host, port, **kw):
            connected.append(host)
            return "stream"

    async def run():
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
        backend = CheckedBackend(UrlPolicy())
        backend.inner = Recorder()
        with pytest.raises(Refused):  # one private address among public ones refuses the name
            await backend.connect_tcp("mixed.test", 80)
        assert await backend.connect_tcp("public.test", 80) == "stream"

    connected: list[str] = []
    asyncio.run(run())
    assert connected == ["93.184.216.34"]  # the checked address itself, not the name (no second lookup)


# ---- Host header (DNS rebinding) ---------------------------------------------------------------------

def test_a_loopback_server_answers_only_loopback_host_names():
    with serving() as (url, _):
        port = url.rsplit(":", 1)[1]
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "127.0.0.2"):
            assert httpx.get(url + "/health", headers={"Host": host}, timeout=5).status_code == 200, host
        for host in (f"evil.example:{port}", "attacker.test", "127.0.0.1.evil.test", "localhost.evil.test"):
            for path, method in (("/health", "GET"), ("/v1/chat/completions", "POST"), ("/", "GET")):
                r = httpx.request(method, url + path, headers={"Host": host}, json=ask_body(), timeout=5)
                assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed", (host, path)
                assert "--allowed_hosts" in r.json()["error"]["message"]
        s = open_socket(url, b"GET /health HTTP/1.0\r\n\r\n")  # no Host at all
        assert s.recv(100).startswith(b"HTTP/1.1 400")
        s.close()
    with serving(allowed_hosts=["ocr.example.com"]) as (url, _):
        assert httpx.get(url + "/health", headers={"Host": "ocr.example.com:8000"}, timeout=5).status_code == 200
        assert httpx.get(url + "/health", headers={"Host": "other.example.com"}, timeout=5).status_code == 400
        assert httpx.get(url + "/health", timeout=5).status_code == 200  # loopback names still work
    assert HostPolicy("0.0.0.0").allows("anything.example") and HostPolicy("127.0.0.1", ["*"]).allows("x.test")
    assert not HostPolicy("0.0.0.0", ["ocr.example.com"]).allows("x.test")


# ---- clients that hang up ------------------------------------------------------------------------------

def test_a_request_whose_client_hung_up_leaves_the_queue_and_is_never_generated():
    engine = FakeEngine()
    engine.hold = threading.Event()
    with serving(engine, max_queue=1, max_batch_size=1) as (url, _):
        try:
            results = {}
            first = threading.Thread(target=lambda: results.update(a=post(url, ask_body("first"), timeout=20)))
            first.start()
            assert engine.started.wait(10)  # "first" is generating; the model is busy
            with pytest.raises(httpx.ReadTimeout):  # queued behind it, then the client gives up
                post(url, ask_body("abandoned"), timeout=0.5)
            deadline = time.monotonic() + 3
            while httpx.get(url + "/health").json()["batching"]["queued"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert httpx.get(url + "/health").json()["batching"]["queued"] == 0
            # its place in the queue (max_queue 1) is free again: a new request is accepted, not 503
            third = threading.Thread(target=lambda: results.update(c=post(url, ask_body("third"), timeout=20)))
            third.start()
            time.sleep(0.3)
        finally:
            engine.hold.set()
        first.join(20)
        third.join(20)
        assert results["a"].status_code == 200 and results["c"].status_code == 200, results["c"].text
        assert [("first" in t, "abandoned" in t, "third" in t) for t in engine.seen] == [(1, 0, 0), (0, 0, 1)]


# ---- numbers and request shapes --------------------------------------------------------------------

BIG = "9" * 400


def bad_shapes() -> list[tuple[str, bytes, int, str]]:
    ok = json.dumps(ask_body())[:-1]  # '{"messages": [...]' to append fields to
    return [
        ("400-digit max_tokens", f'{ok}, "max_tokens": {BIG}}}', 400, "'max_tokens' is 9999999999...(400 digits)"),
        ("-400-digit max_completion_tokens", f'{ok}, "max_completion_tokens": -{BIG}}}', 400,
         "'max_completion_tokens' is -999999999...(401 digits); it must be >= 1 and <= 32"),
        ("400-digit temperature", f'{ok}, "temperature": {BIG}}}', 400, "'temperature' is 9999999999...(400 digits)"),
        ("400-digit top_p", f'{ok}, "top_p": -{BIG}}}', 400, "'top_p' is -999999999...(401 digits); it must be > 0"),
        ("400-digit n", f'{ok}, "n": {BIG}}}', 400, "'n' must be 1 (one answer per request), got 9999999999..."),
        ("NaN temperature", f'{ok}, "temperature": NaN}}', 400, "'temperature' is nan"),
        ("Infinity top_p", f'{ok}, "top_p": Infinity}}', 400, "'top_p' is inf"),
        ("1e400 temperature", f'{ok}, "temperature": 1e400}}', 400, "'temperature' is inf"),
        ("NaN n", f'{ok}, "n": NaN}}', 400, "'n' must be 1"),
        ("float max_tokens", f'{ok}, "max_tokens": 1e3}}', 400, "'max_tokens' must be an integer, got a number"),
        ("messages of strings", '{"messages": ["hi", "there"]}', 400,
         "messages[0] must be an object with 'role' and 'content', got a string"),
        ("bare string part", '{"messages": [{"role": "user", "content": ["hi"]}]}', 400,
         'messages[0].content[0] must be an object like {"type": "text", "text": ...}, got a string'),
        ("messages as broken JSON text", '{"messages": "[{\\"role\\": \\"user\\""}', 400,
         "'messages' must be an array of {role, content} objects, got a string (send the array itself"),
        ("content an object", '{"messages": [{"role": "user", "content": {"text": "x"}}]}', 400,
         "messages[0].content must be a string or an array of parts, got an object"),
        ("text a number", '{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', 400,
         "messages[0].content[0].text must be a string"),
        ("type a list", '{"messages": [{"role": "user", "content": [{"type": ["text"]}]}]}', 400,
         "messages[0].content[0].type must be 'text' or 'image_url'"),
        ("include_usage a list", f'{ok}, "stream": true, "stream_options": {{"include_usage": [1]}}}}', 400,
         "'stream_options.include_usage' must be true or false, got an array"),
        ("5000-digit number", f'{ok}, "max_tokens": {"9" * 5000}}}', 400, "request body is not valid JSON"),
    ]


def test_out_of_range_numbers_and_odd_shapes_get_400_with_one_clear_message():
    with serving(max_request_mb=0.05) as (url, engine):
        failures = []
        for name, raw, status, words in bad_shapes():
            r = httpx.post(url + "/v1/chat/completions", content=raw.encode(), timeout=10,
                           headers={"Content-Type": "application/json"})
            message = r.json().get("error", {}).get("message", "") if r.headers["content-type"].endswith("json") else ""
            if r.status_code != status or not message.startswith(words) and words not in message:
                failures.append(f"{name}: {r.status_code} {r.text[:200]}")
        assert not failures, "\n".join(failures)
        # huge bodies: declared (Content-Length) or streamed without one (chunked): 413, nothing generated
        big = b'{"messages": "' + b"A" * 60_000 + b'"}'
        r = httpx.post(url + "/v1/chat/completions", content=big, timeout=10)
        assert r.status_code == 413 and "more than the 52428" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/chat/completions", content=iter([big[:30_000], big[30_000:]]), timeout=10)
        assert r.status_code == 413 and "more than the 52428" in r.json()["error"]["message"]
        assert engine.seen == []
        assert post(url, ask_body("still fine")).status_code == 200


# ---- the new flags -----------------------------------------------------------------------------------

def test_new_flags_parse_and_bad_values_are_one_line_user_errors():
    import argparse

    from ocrtune.cli.parsing import add_dataclass_args, build
    from ocrtune.errors import UserError
    from ocrtune.serve.app import validate
    from ocrtune.serve.args import ServeArgs
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ServeArgs)
    args = build(ServeArgs, parser.parse_args(["--allowed_hosts", "ocr.example.com,*.lan", "--allowed_image_hosts",
                                               "10.0.0.0/8", "--header_timeout", "2.5", "--max_connections", "64"]))
    assert args.allowed_hosts == ["ocr.example.com", "*.lan"] and args.allowed_image_hosts == ["10.0.0.0/8"]
    assert (args.header_timeout, args.body_timeout, args.max_connections) == (2.5, 60.0, 64)
    validate(args)
    for field, value, message in (("header_timeout", 0, "--header_timeout must be positive"),
                                  ("body_timeout", -1, "--body_timeout must be positive"),
                                  ("image_fetch_timeout", 0, "--image_fetch_timeout must be positive"),
                                  ("max_connections", 0, "--max_connections must be at least 1")):
        with pytest.raises(UserError) as e:
            validate(ServeArgs(**{field: value}))
        assert str(e.value).startswith(message)
