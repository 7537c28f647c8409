"""`ocrtune serve`: the OpenAI-compatible API on the tiny model, in a real server process on a free
loopback port. Covers the official `openai` client (plain and streamed), 30+ kinds of bad requests
(each a 4xx with a message while the server keeps answering), 50 concurrent requests with batching,
the web page's static files, and the batcher's failure isolation with a slow fake engine."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ocrtune.models.generate import Answer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "ocrtune" / "data" / "sample" / "validation.parquet"
KEY = "sk-test-0123456789"
NAME = "tiny-ocr"
MAX_NEW = 64


def sample_images(n: int) -> list[bytes]:
    import pyarrow.parquet as pq
    rows = pq.read_table(SAMPLE).to_pylist()
    return [r["image"]["bytes"] for r in rows[:n]]


def png_bytes(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(data).decode()


def image_message(url: str, text: str | None = None) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def start_server(extra: list[str], log_path: Path, timeout: float = 180.0):
    """Start `ocrtune serve --port 0 ...` and return (process, base url) once it listens."""
    out = open(log_path, "w")
    cmd = [sys.executable, "-m", "ocrtune", "serve", "--model", "tiny", "--port", "0", "--log_level", "warning", *extra]
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ})
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = log_path.read_text()
        m = re.search(r"listening on (http://127\.0\.0\.1:\d+)", text)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not start in {timeout}s:\n{log_path.read_text()[-3000:]}")


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_server(["--api_key", KEY, "--served_model_name", NAME, "--max_new_tokens", str(MAX_NEW),
                              "--max_request_mb", "2", "--max_image_pixels", "4000000", "--max_batch_size", "8",
                              "--batch_wait_ms", "20"], log)
    yield {"url": url, "proc": proc, "log": log}
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def auth() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def post(server, body, headers=None, raw: bytes | None = None, timeout=120) -> httpx.Response:
    h = {**auth(), **(headers or {})}
    if raw is not None:
        return httpx.post(server["url"] + "/v1/chat/completions", content=raw, headers=h, timeout=timeout)
    return httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=h, timeout=timeout)


def test_health_models_and_page(server, client):
    h = httpx.get(server["url"] + "/health").json()
    assert h["status"] == "ok" and h["model"] == NAME and h["auth_required"] is True
    assert h["limits"]["max_new_tokens"] == MAX_NEW and h["limits"]["max_request_bytes"] == 2 * 1024 * 1024
    assert h["limits"]["allow_image_urls"] is False
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    # the page and its bundled KaTeX are served without a key and reference nothing off-site
    page = httpx.get(server["url"] + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "/static/katex/katex.min.js" in page.text and "http" not in page.text.replace("http-equiv", "")
    css = httpx.get(server["url"] + "/static/katex/katex.min.css")
    assert css.status_code == 200
    fonts = sorted(set(re.findall(r"url\((fonts/[^)]+)\)", css.text)))
    assert len(fonts) >= 15 and all(f.endswith(".woff2") for f in fonts)
    for f in fonts:
        r = httpx.get(server["url"] + "/static/katex/" + f)
        assert r.status_code == 200 and r.content[:4] == b"wOF2", f
    js = httpx.get(server["url"] + "/static/katex/katex.min.js")
    assert js.status_code == 200 and b"katex" in js.content[:2000].lower()
    assert httpx.get(server["url"] + "/static/app.js").status_code == 200


def test_answer_matches_the_model_and_stream_matches_plain(server, client):
    img = sample_images(1)[0]
    messages = image_message(data_url(img))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert isinstance(text, str) and text.strip() == text and len(text) > 0
    assert r.model == NAME and r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    # the same answer as the model itself gives for the OCR prompt (greedy)
    from ocrtune.data.loading import ocr_record
    from ocrtune.serve.args import ServeArgs
    from ocrtune.serve.loader import load_engine
    engine, info = load_engine(ServeArgs(model="tiny"))
    assert info["kind"] == "base"
    assert engine.generate([ocr_record(Image.open(io.BytesIO(img)).convert("RGB"))], max_new_tokens=24)[0] == text

    # greedy is deterministic, and streaming gives exactly the same text
    again = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
    assert again.choices[0].message.content == text
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    pieces, finishes, usage, ids = [], [], None, set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert "".join(pieces) == text
    assert finishes == [r.choices[0].finish_reason] and len(ids) == 1
    assert usage.completion_tokens == r.usage.completion_tokens and usage.prompt_tokens == r.usage.prompt_tokens

    # raw SSE framing: data lines, JSON chunks, ending with [DONE]
    body = {"model": NAME, "messages": messages, "max_tokens": 8, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, headers=auth(), timeout=60) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line for line in s.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"

    # a text question next to the image, and an image with a transparent background, also work
    r2 = client.chat.completions.create(model=NAME, max_tokens=4, messages=image_message(
        data_url(png_bytes(Image.new("RGBA", (90, 30), (0, 0, 0, 0)))), "Using LaTeX to perform OCR on the image."))
    assert r2.choices[0].message.content


def bad_requests(server) -> list[tuple[str, dict, int, str]]:
    """(name, kwargs for post(), expected status, expected words in the message)"""
    good_png = sample_images(1)[0]
    b64 = base64.b64encode(good_png).decode()
    ok_msgs = image_message(data_url(good_png))
    huge = png_bytes(Image.new("L", (2100, 2100), 255))  # 4.4 M pixels > --max_image_pixels 4000000
    cut = b64[: (len(b64) // 2) // 4 * 4]  # valid base64 of half a PNG
    reserved = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(good_png)}},
                                             {"type": "text", "text": "hi <|image_pad|>"}]}]
    nine = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(good_png)}}] * 9}]
    return [
        ("malformed JSON", dict(body=None, raw=b'{"messages": [}'), 400, "not valid JSON"),
        ("empty body", dict(body=None, raw=b""), 400, "empty"),
        ("not UTF-8", dict(body=None, raw=b'{"messages": "\xff\xfe"}'), 400, "not valid JSON"),
        ("deeply nested JSON", dict(body=None, raw=b"[" * 100_000 + b"]" * 100_000), 400, "JSON"),
        ("JSON array body", dict(body=[1, 2]), 400, "must be a JSON object"),
        ("no messages", dict(body={"model": NAME}), 400, "'messages' is required"),
        ("messages is a string", dict(body={"messages": "hello"}), 400, "must be an array"),
        ("messages empty", dict(body={"messages": []}), 400, "empty"),
        ("message not an object", dict(body={"messages": [42]}), 400, "must be an object"),
        ("bad role", dict(body={"messages": [{"role": "robot", "content": "x"}]}), 400, "role must be one of"),
        ("content is a number", dict(body={"messages": [{"role": "user", "content": 7}]}), 400,
         "must be a string or an array"),
        ("unknown part type", dict(body={"messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}),
         400, ".type must be"),
        ("image_url without url", dict(body={"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                                       "image_url": {}}]}]}),
         400, "url is required"),
        ("image url is a number", dict(body={"messages": image_message(12345)}), 400, "must be a string"),
        ("http URL refused", dict(body={"messages": image_message("http://127.0.0.1:9/x.png")}), 400,
         "--allow_image_urls"),
        ("local path refused", dict(body={"messages": image_message("/etc/passwd")}), 400, "never read"),
        ("file URL refused", dict(body={"messages": image_message("file:///etc/passwd")}), 400, "never read"),
        ("data URL not base64", dict(body={"messages": image_message("data:image/png,abcd")}), 400, "base64"),
        ("data URL not an image type", dict(body={"messages": image_message("data:text/plain;base64," + b64)}), 400,
         "not an image"),
        ("invalid base64 characters", dict(body={"messages": image_message("data:image/png;base64,@@@!!")}), 400,
         "not base64"),
        ("truncated base64", dict(body={"messages": image_message("data:image/png;base64," + b64[:-3] + "=")}), 400,
         "truncated"),
        ("truncated image", dict(body={"messages": image_message("data:image/png;base64," + cut)}), 400,
         "truncated or corrupt"),
        ("empty data URL", dict(body={"messages": image_message("data:image/png;base64,")}), 400, "no data"),
        ("text posing as an image", dict(body={"messages": image_message(data_url(b"%PDF-1.4 not an image at all"))}),
         400, "not an image"),
        ("oversized image", dict(body={"messages": image_message(data_url(huge))}), 400, "pixels"),
        ("body too large", dict(body=None, raw=b'{"messages": "' + b"A" * (2 * 1024 * 1024 + 10) + b'"}'), 413,
         "more than"),
        ("max_tokens too large", dict(body={"messages": ok_msgs, "max_tokens": 100_000}), 400, "max_tokens"),
        ("max_tokens zero", dict(body={"messages": ok_msgs, "max_tokens": 0}), 400, "max_tokens"),
        ("max_tokens a string", dict(body={"messages": ok_msgs, "max_tokens": "ten"}), 400, "must be an integer"),
        ("max_tokens a float", dict(body={"messages": ok_msgs, "max_tokens": 3.5}), 400, "must be an integer"),
        ("temperature out of range", dict(body={"messages": ok_msgs, "temperature": 9}), 400, "temperature"),
        ("temperature a string", dict(body={"messages": ok_msgs, "temperature": "hot"}), 400, "must be a number"),
        ("top_p zero", dict(body={"messages": ok_msgs, "top_p": 0}), 400, "top_p"),
        ("n = 2", dict(body={"messages": ok_msgs, "n": 2}), 400, "'n' must be 1"),
        ("stream not a bool", dict(body={"messages": ok_msgs, "stream": "yes"}), 400, "'stream' must be"),
        ("unknown model", dict(body={"model": "gpt-4o", "messages": ok_msgs}), 404, "not served here"),
        ("last message from the assistant", dict(body={"messages": [*ok_msgs, {"role": "assistant", "content": "x"}]}),
         400, "last message"),
        ("image in an assistant message", dict(body={"messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": data_url(good_png)}}]}, *ok_msgs]}), 400, "only allowed in user"),
        ("reserved token in text", dict(body={"messages": reserved}), 400, "reserved token"),
        ("<image> tag in text", dict(body={"messages": [{"role": "user", "content": "<image> read"}]}), 400, "<image>"),
        ("too many images", dict(body={"messages": nine}), 400, "too many images"),
        ("form body", dict(body=None, raw=json.dumps({"messages": ok_msgs}).encode(),
                           headers={"Content-Type": "application/x-www-form-urlencoded"}), 415, "send the body as JSON"),
        ("text/plain body", dict(body=None, raw=json.dumps({"messages": ok_msgs}).encode(),
                                 headers={"Content-Type": "text/plain; charset=utf-8"}), 415, "'text/plain' is not"),
        ("lone surrogate in text", dict(body=None, raw=b'{"messages": [{"role": "user", "content": "x\\ud800y"}]}',
                                        headers={"Content-Type": "application/json"}), 400, "lone surrogate (U+D800)"),
        ("no API key", dict(body={"messages": ok_msgs}, headers={"Authorization": ""}), 401, "API key"),
        ("wrong API key", dict(body={"messages": ok_msgs}, headers={"Authorization": "Bearer nope"}), 401, "API key"),
    ]


def test_bad_requests_get_4xx_and_server_keeps_serving(server, client):
    import openai
    cases = bad_requests(server)
    assert len(cases) >= 20
    good = {"model": NAME, "messages": image_message(data_url(sample_images(1)[0])), "max_tokens": 4}
    failures = []
    for i, (name, kw, status, words) in enumerate(cases):
        r = post(server, kw.get("body"), headers=kw.get("headers"), raw=kw.get("raw"))
        try:
            err = r.json()["error"]
        except Exception:
            err = {}
        if r.status_code != status or words.lower() not in str(err.get("message", "")).lower() or "type" not in err:
            failures.append(f"{name}: got {r.status_code} {r.text[:200]!r}, wanted {status} with {words!r}")
        if i % 10 == 9:  # good requests keep working in between
            assert post(server, good).status_code == 200
    assert not failures, "\n".join(failures)
    # endpoints and methods that don't exist
    r = httpx.get(server["url"] + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]
    r = httpx.get(server["url"] + "/v1/chat/completions", headers=auth())
    assert r.status_code == 405 and "not allowed" in r.json()["error"]["message"]
    r = httpx.get(server["url"] + "/v1/models")
    assert r.status_code == 401
    # the openai client surfaces the messages as its typed errors
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=NAME, messages=good["messages"], max_tokens=MAX_NEW + 1)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="other", messages=good["messages"])
    with pytest.raises(openai.AuthenticationError):
        type(client)(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    # a streamed request with a bad image fails before the stream starts, as a 400
    with pytest.raises(openai.BadRequestError, match="not base64"):
        client.chat.completions.create(model=NAME, messages=image_message("data:image/png;base64,%%%"), stream=True)
    # still alive and answering
    assert server["proc"].poll() is None
    r = post(server, good)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert "Traceback" not in server["log"].read_text()


def test_max_tokens_cut_says_length_with_the_generated_token_count(server, client):
    """finish_reason 'length' and completion_tokens = tokens generated when max_tokens cuts the answer
    (OpenAI's definition), plain and streamed; the count comes from the generated ids, not from
    re-tokenizing the stripped text (which gave 0 tokens and 'stop' for 5 special tokens)."""
    import torch

    from ocrtune.data.loading import ocr_record
    from ocrtune.serve.args import ServeArgs
    from ocrtune.serve.loader import load_engine
    engine, _ = load_engine(ServeArgs(model="tiny"))
    img = sample_images(3)[2]
    expected = engine.generate_answers([ocr_record(Image.open(io.BytesIO(img)).convert("RGB"))], max_new_tokens=5)[0]
    assert (expected.tokens, expected.finish_reason) == (5, "length")  # the random tiny model doesn't stop in 5
    messages = image_message(data_url(img))
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", 5)
    assert r.choices[0].message.content == expected.text
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert [c.usage.completion_tokens for c in chunks if c.usage] == [5]
    # an answer that ends: counted up to and including its stop token, padding after it ignored
    end, pad = engine.tokenizer.convert_tokens_to_ids("<|im_end|>"), engine.tokenizer.pad_token_id
    a = engine._answer(torch.tensor([11, 12, end, pad, pad]))
    assert (a.tokens, a.finish_reason) == (3, "stop")


def test_50_concurrent_requests_are_batched(server):
    images = sample_images(10)
    before = httpx.get(server["url"] + "/health").json()["batching"]

    def one(i):
        body = {"model": NAME, "max_tokens": 6, "messages": image_message(data_url(images[i % len(images)]))}
        return post(server, body, timeout=300)

    t0 = time.time()
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    elapsed = time.time() - t0
    assert [r.status_code for r in results] == [200] * 50
    answers = [r.json() for r in results]
    assert all(a["choices"][0]["message"]["content"] for a in answers)
    assert len({a["id"] for a in answers}) == 50
    assert all(a["usage"]["completion_tokens"] <= 6 for a in answers)
    after = httpx.get(server["url"] + "/health").json()["batching"]
    assert after["requests"] - before["requests"] == 50
    assert after["batches"] - before["batches"] < 50  # some requests shared a batch
    assert 1 < after["max_batch_size_seen"] <= 8
    assert sum(int(k) * v for k, v in after["batch_sizes"].items()) == after["requests"]
    assert after["errors"] == 0
    print(f"50 concurrent requests in {elapsed:.1f}s, batch sizes {after['batch_sizes']}")


def test_cli_refuses_a_taken_port_and_bad_flags(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "ocrtune", "serve", "--model", "tiny", "--port", str(port)],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and f"can't listen on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "ocrtune", "serve", "--max_batch_size", "0"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 2 and "--max_batch_size must be at least 1" in r.stderr


# ---- the batcher with a slow fake engine (in-process server): responsiveness and failure isolation ----

class SlowEngine:  # implements ocrtune.serve.engine.Engine
    """Real tiny template (the server encodes prompts with it), fake generation: `batch_seconds` (0.4 s)
    per batch, `generating` set when a batch starts, and a batch holding a prompt with 'boom' fails."""

    def __init__(self, template):
        self.template, self.batches = template, []
        self.batch_seconds, self.generating = 0.4, threading.Event()

    def _text(self, record) -> str:
        return self.template.tokenizer.decode(record["input_ids"])

    def generate_answers(self, records, max_new_tokens=512, temperature=0.0, top_p=1.0):
        self.batches.append(len(records))
        self.generating.set()
        time.sleep(self.batch_seconds)
        if any("boom" in self._text(r) for r in records):
            raise RuntimeError("boom in this batch")
        return [Answer(f"x_{{{len(r['image_grid_thw'])}}} + {max_new_tokens}", 5, "stop") for r in records]

    def stream(self, record, max_new_tokens=512, stop=None, usage=None, temperature=0.0, top_p=1.0):
        self.streamed = 0
        pieces = ["  x", "_{", "1}", " + ", f"{max_new_tokens}  "] if max_new_tokens < 30 else ["a "] * 100
        for piece in pieces:
            if stop is not None and stop.is_set():
                return
            time.sleep(0.05)
            self.streamed += 1
            yield piece
        if usage is not None:
            usage.update(tokens=self.streamed, finish_reason="stop")


@pytest.fixture(scope="module")
def fake_server(tiny_model_dir):
    import uvicorn

    from ocrtune.models.loading import load_processor
    from ocrtune.models.template import Template
    from ocrtune.serve.app import bind, create_app
    from ocrtune.serve.args import ServeArgs

    engine = SlowEngine(Template(load_processor(tiny_model_dir)))
    args = ServeArgs(max_batch_size=4, batch_wait_ms=200, max_new_tokens=32, max_queue=10, allow_image_urls=True,
                     allowed_image_hosts=["127.0.0.1"])  # the test's image server is on loopback
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(args, engine, "fake"), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield url, engine
    server.should_exit = True
    thread.join(10)


def test_batcher_isolates_failures_and_keeps_loop_responsive(fake_server):
    url, engine = fake_server
    img = data_url(png_bytes(Image.new("RGB", (60, 20), "white")))

    def ask(text):
        return httpx.post(url + "/v1/chat/completions", json={"messages": image_message(img, text), "max_tokens": 7},
                          timeout=60)

    # while a batch generates (1 s here), the event loop still answers at once: a blocked loop would answer
    # /health only when the batch ends, ~1 s later. Waiting for the batch to start (not a fixed sleep) keeps
    # this true on a loaded machine, where encoding the four requests can take longer than the batch wait.
    engine.batch_seconds = 1.0
    engine.generating.clear()
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ask, t) for t in ("a", "b", "boom", "c")]
            assert engine.generating.wait(30)
            t0 = time.time()
            h = httpx.get(url + "/health", timeout=5).json()
            health_latency = time.time() - t0
            results = [f.result() for f in futures]
    finally:
        engine.batch_seconds = 0.4
    assert health_latency < 0.5 and h["batching"]["busy"] is True
    assert [r.status_code for r in results] == [200, 200, 500, 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in (results[0], results[1], results[3])] == ["x_{1} + 7"] * 3
    assert "boom in this batch" in results[2].json()["error"]["message"]
    assert engine.batches[0] == 4  # one batch of 4 first, then retried one by one to find the bad request
    assert engine.batches[1:5] == [1, 1, 1, 1]
    # streaming: leading/trailing whitespace trimmed exactly like the plain answer
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json={"messages": image_message(img), "max_tokens": 5, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "x_{1} + 5"
    # a streaming client that goes away stops its generation (100 pieces of 0.05 s would take 5 s)
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json={"messages": image_message(img), "max_tokens": 30, "stream": True}) as s:
        for line in s.iter_lines():  # leave once a piece has come: the generation is running (on a loaded machine
            # the first line alone could come before it started, leaving nothing to stop: streamed 0, seen in CI)
            if line.startswith("data: {") and any(c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
                break
    time.sleep(1.0)
    assert 0 < engine.streamed < 40
    assert ask("after").status_code == 200
    # a full queue gets 503, not a hang
    with ThreadPoolExecutor(30) as pool:
        codes = [r.status_code for r in pool.map(lambda _: ask("q"), range(30))]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) >= 10


def test_image_urls_are_fetched_only_when_allowed(fake_server, tmp_path):
    """The fake server runs with --allow_image_urls (and --allowed_image_hosts 127.0.0.1): http(s) URLs are
    fetched, paths and file:// never; a failed fetch and a fetched non-image get the same message."""
    from ocrtune.serve.fetch import REFUSED
    import http.server
    import socketserver
    url, _ = fake_server
    (tmp_path / "f.png").write_bytes(png_bytes(Image.new("RGB", (60, 20), "white")))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    handler_cls = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    handler = lambda *a, **k: handler_cls(*a, directory=str(tmp_path), **k)  # noqa: E731
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{httpd.server_address[1]}"

        def ask(image_url):
            return httpx.post(url + "/v1/chat/completions", timeout=30,
                              json={"messages": image_message(image_url), "max_tokens": 3})
        try:
            r = ask(base + "/f.png")
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "x_{1} + 3"
            for missing_or_bad in ("/missing.png", "/bad.png"):
                r = ask(base + missing_or_bad)
                assert r.status_code == 400 and r.json()["error"]["message"].endswith(REFUSED)
            for ref in (str(tmp_path / "f.png"), "file://" + str(tmp_path / "f.png")):
                r = ask(ref)
                assert r.status_code == 400 and "never read" in r.json()["error"]["message"]
        finally:
            httpd.shutdown()


def test_serves_a_lora_checkpoint(tiny_model_dir, tmp_path):
    """--ckpt_dir: a LoRA checkpoint from a (very short) sft run loads on its base model."""
    from ocrtune.data.loading import ocr_record
    from ocrtune.serve.args import ServeArgs
    from ocrtune.serve.loader import load_engine
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import run_sft
    result = run_sft(SftArgs(model=str(tiny_model_dir), dataset=["latex-ocr-sample#8"], dataset_test_ratio=0.25,
                             max_steps=2, eval_steps=2, batch_size=2, learning_rate=5e-3, output_dir=str(tmp_path / "run"),
                             report_to=["none"]))
    ckpt = Path(result["last_model_checkpoint"])
    proc, url = start_server(["--ckpt_dir", str(ckpt)], tmp_path / "server.log")
    try:
        name = f"{ckpt.parent.name}/{ckpt.name}"
        assert httpx.get(url + "/health").json()["model"] == name
        img = sample_images(2)[1]
        r = post({"url": url}, {"model": name, "max_tokens": 12, "messages": image_message(data_url(img))})
        assert r.status_code == 200, r.text
        engine, info = load_engine(ServeArgs(ckpt_dir=str(ckpt)))
        assert info["kind"] == "lora"
        expected = engine.generate([ocr_record(Image.open(io.BytesIO(img)).convert("RGB"))], max_new_tokens=12)[0]
        assert r.json()["choices"][0]["message"]["content"] == expected
    finally:
        stop_server(proc)
