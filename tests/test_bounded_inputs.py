"""Every user file and URL is read bounded: regular files only (a FIFO can't hang a run, a link to /dev/zero can't
fill memory), a size cap checked before reading and a read that stops past it, URL fetches with a byte cap and a
total deadline; a row's text bounded before it is tokenized; an unreadable image dropped like any bad row."""
from __future__ import annotations

import http.server
import io
import json
import logging
import os
import socketserver
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from ocrtune.data import images
from ocrtune.data.images import BadImage, open_image
from ocrtune.errors import UserError
from ocrtune.fileio import read_json


def png(size=(40, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 255).save(buf, "PNG")
    return buf.getvalue()


def finishes(fn, seconds=5.0):
    """fn's exception (or result) if it returns within `seconds`; a call that blocks fails the test, not hangs it."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds} s"
    return out.get("error", out.get("value"))


# ---- local files

def test_a_fifo_image_path_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "formula.png"
    os.mkfifo(fifo)
    err = finishes(lambda: open_image(str(fifo)))
    assert isinstance(err, BadImage) and str(err) == f"image file {fifo} is a FIFO, not a regular file"


def test_a_fifo_swapped_in_after_the_check_cannot_block_the_open(tmp_path, monkeypatch):
    """The path passes the stat check (as a regular file would), then a FIFO stands there: the open is
    non-blocking and the open file is checked again."""
    from ocrtune.fileio import UnsafeFile, read_bounded
    fifo, regular = tmp_path / "swap.png", tmp_path / "real.png"
    os.mkfifo(fifo)
    regular.write_bytes(png())
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(regular if str(p) == str(fifo) else p, *a, **k))
    err = finishes(lambda: read_bounded(fifo, 1000, "image file"))
    assert isinstance(err, UnsafeFile) and "is a FIFO" in str(err)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_a_link_to_an_endless_device_is_refused(tmp_path, device):
    link = tmp_path / "x.png"
    link.symlink_to(device)
    err = finishes(lambda: open_image(str(link)))
    assert isinstance(err, BadImage) and str(err) == f"image file {link} is a character device, not a regular file"


def test_a_small_png_followed_by_a_gigabyte_is_refused_from_its_size(tmp_path):
    """2 KB of PNG then 1 GiB of zeros (sparse here): refused from the size, not read whole."""
    path = tmp_path / "padded.png"
    with open(path, "wb") as f:
        f.write(png())
        f.truncate(2**30 + 2048)
    t0 = time.time()
    with pytest.raises(BadImage, match=rf"is {2**30 + 2048} bytes, over the {images.MAX_IMAGE_BYTES}-byte limit"):
        open_image(str(path))
    with pytest.raises(BadImage, match="-byte limit"):
        images.image_size(str(path))
    assert time.time() - t0 < 1.0


def test_a_file_growing_past_the_bound_is_not_read_past_it(tmp_path, monkeypatch):
    """The size checked up front can be stale: the read itself stops at bound + 1 bytes."""
    from ocrtune import fileio
    from ocrtune.fileio import UnsafeFile, read_bounded
    path = tmp_path / "grows.bin"
    path.write_bytes(b"x" * 5000)
    monkeypatch.setattr(fileio, "check_regular", lambda *a, **k: 0)  # as if it was small when checked
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    with pytest.raises(UnsafeFile, match="over the 1000-byte limit"):
        read_bounded(path, 1000)
    assert sum(reads) <= 1001


def test_json_files_are_read_bounded(tmp_path):
    link = tmp_path / "config.json"
    link.symlink_to("/dev/zero")
    err = finishes(lambda: read_json(link))
    assert isinstance(err, UserError) and str(err).startswith(f"JSON file {link} is a character device, not a regular")
    fifo = tmp_path / "args.json"
    os.mkfifo(fifo)
    err = finishes(lambda: read_json(fifo))
    assert isinstance(err, UserError) and "is a FIFO" in str(err)
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"a": "x" * 2000}))
    with pytest.raises(UserError, match="over the 1000-byte limit"):
        read_json(big, max_bytes=1000)


def test_dataset_files_must_be_regular(tmp_path, monkeypatch):
    from ocrtune.data import loading
    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    err = finishes(lambda: loading.load_dataset(str(fifo)))
    assert isinstance(err, UserError) and str(err) == \
        f"dataset file {fifo} is a FIFO, not a regular file; pass a regular file or a folder of them"
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"query": "q", "response": "r"}) + "\n")
    (folder / "b.jsonl").symlink_to("/dev/zero")
    err = finishes(lambda: loading.load_dataset(str(folder)))
    assert isinstance(err, UserError) and "b.jsonl is a character device" in str(err)
    whole = tmp_path / "rows.json"
    whole.write_text(json.dumps([{"query": "q", "response": "r"}] * 50))
    monkeypatch.setattr(loading, "MAX_JSON_DATASET_BYTES", 100)
    with pytest.raises(UserError, match=r"over the 100-byte limit; convert it to \.jsonl"):
        loading.load_dataset(str(whole))


# ---- URLs

class Server:
    """A local HTTP server whose one route behaves as `body(handler)` says."""

    def __init__(self, body):
        handler = type("H", (http.server.BaseHTTPRequestHandler,),
                       {"do_GET": lambda h: body(h), "log_message": lambda *a: None})
        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/img.png"

    def __enter__(self):
        return self.url

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def endless(h):
    h.send_response(200)
    h.end_headers()
    try:
        while True:
            h.wfile.write(b"\0" * 65536)
    except OSError:
        pass


def test_an_endless_url_stops_at_the_byte_cap(monkeypatch):
    monkeypatch.setattr(images, "MAX_IMAGE_BYTES", 2**20)
    with Server(endless) as url:
        err = finishes(lambda: open_image(url), 10)
    assert isinstance(err, BadImage) and str(err) == f"image URL {url} sent more than the 1048576-byte limit"


def test_a_url_announcing_too_many_bytes_is_refused_before_its_body(monkeypatch):
    def huge(h):
        h.send_response(200)
        h.send_header("Content-Length", str(3 * 2**30))
        h.end_headers()
        h.wfile.write(b"\0" * 1000)
    with Server(huge) as url:
        err = finishes(lambda: open_image(url), 10)
    assert isinstance(err, BadImage) and str(err) == \
        f"image URL {url} is {3 * 2**30} bytes, over the {images.MAX_IMAGE_BYTES}-byte limit"


def test_a_trickling_url_ends_at_the_total_deadline(monkeypatch):
    """One byte every 0.1 s never trips a per-read timeout; the total deadline ends it."""
    monkeypatch.setattr(images, "URL_DEADLINE_S", 1.0)

    def trickle(h):
        h.send_response(200)
        h.end_headers()
        try:
            for _ in range(200):
                h.wfile.write(b"\0")
                h.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass
    with Server(trickle) as url:
        t0 = time.time()
        err = finishes(lambda: open_image(url), 10)
    assert isinstance(err, BadImage) and str(err) == f"image URL {url} took longer than 1 s to fetch"
    assert time.time() - t0 < 3


# ---- rows

TOKENIZED: list[int] = []  # module-level: `datasets` may work on a copy of the template


class CountingTemplate:
    """Stands in for the run's template: records the length of what it was asked to tokenize."""
    max_length = 100

    def token_count(self, messages, image_sizes):
        TOKENIZED.append(sum(len(m["content"]) for m in messages))
        return 10


def rows_dataset(rows):
    import datasets

    from ocrtune.data.loading import FEATURES
    return datasets.Dataset.from_list([{**r, "_row": i} for i, r in enumerate(rows)], features=FEATURES)


def row(text="x^2", images_=()):
    return {"messages": [{"role": "user", "content": "<image>" * len(images_) + "ocr"},
                         {"role": "assistant", "content": text}], "images": list(images_)}


def test_a_huge_row_text_is_dropped_or_refused_before_tokenizing(caplog):
    from ocrtune.data.checks import MAX_TEXT_CHARS, check_dataset, row_problem
    from ocrtune.train.data import row_lengths
    n = MAX_TEXT_CHARS + 1
    ds = rows_dataset([row(), row("y" * n), row()])
    t = CountingTemplate()
    TOKENIZED.clear()
    assert row_problem(ds[1], template=t) == f"assistant text is {n} characters, over the {MAX_TEXT_CHARS} limit"
    assert TOKENIZED == []  # refused before the template saw it
    with caplog.at_level(logging.WARNING, logger="ocrtune"):
        kept = check_dataset(ds, "discard", "data", num_proc=1, template=t)
    assert len(kept) == 2
    assert "data: dropped 1 of 3 rows (text too long: 1)" in caplog.text
    with pytest.raises(UserError, match=rf"row 1 of data: assistant text is {n} characters, over the {MAX_TEXT_CHARS} "):
        check_dataset(ds, "error", "data", num_proc=1, template=t)
    TOKENIZED.clear()  # --check_dataset_strategy none: the packing plan measures it as 0 tokens, untokenized
    assert row_lengths(list(ds), t) == [10, 0, 10] and len(TOKENIZED) == 2 and max(TOKENIZED) < 100


def test_a_permission_denied_image_is_dropped_under_discard(tmp_path, monkeypatch, caplog):
    """Tests run as root, whom chmod 000 does not stop: the open itself raises PermissionError."""
    from ocrtune.data.checks import check_dataset
    good, denied = tmp_path / "good.png", tmp_path / "denied.png"
    good.write_bytes(png())
    denied.write_bytes(png())
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(p)))
                        if str(p) == str(denied) else real_open(p, *a, **k))
    ds = rows_dataset([row(images_=[{"bytes": None, "path": str(good)}]),
                       row(images_=[{"bytes": None, "path": str(denied)}])])
    with caplog.at_level(logging.WARNING, logger="ocrtune"):
        kept = check_dataset(ds, "discard", "data", num_proc=1)
    assert [r["images"][0]["path"] for r in kept] == [str(good)]
    assert "data: dropped 1 of 2 rows (can't be read: 1)" in caplog.text
    with pytest.raises(UserError, match=rf"row 1 of data: image file {denied} can't be read \(Permission denied\)"):
        check_dataset(ds, "error", "data", num_proc=1)
