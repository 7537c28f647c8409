"""The data pipeline at scale: packing plans from image headers and token counts (no pixels
decoded up front), computed in parallel and cached; encoding happens on access (dataloader workers)."""
from __future__ import annotations

import pytest

from ocrtune.data.loading import load_dataset
from ocrtune.models.loading import load_processor
from ocrtune.models.template import Template
from ocrtune.train.data import EncodedDataset, row_lengths


@pytest.fixture(scope="module")
def template(tiny_model_dir):
    return Template(load_processor(tiny_model_dir), "qwen2_vl", 2048)


@pytest.mark.parametrize("max_pixels,min_pixels", [(None, None), (120_000, 30_000), (30_000, None)])
def test_planned_lengths_equal_encoded_lengths(template, max_pixels, min_pixels):
    template.set_pixels(max_pixels, min_pixels)
    ds = load_dataset("latex-ocr-sample")
    encoded = EncodedDataset(ds, template)
    expected = [len(s["input_ids"]) if (s := encoded[i]) is not None else 0 for i in range(len(ds))]
    assert row_lengths(ds, template) == expected
    assert row_lengths([ds[i] for i in range(20)], template) == expected[:20]  # the list path agrees


def test_lengths_decode_no_pixels_and_parallel_matches_serial(template, monkeypatch):
    template.set_pixels(None, None)
    ds = load_dataset("latex-ocr-sample")
    serial = row_lengths(ds, template, num_proc=1)

    def no_encode(*a, **k):
        raise AssertionError("lengths must not encode samples")
    monkeypatch.setattr(Template, "encode", no_encode)
    monkeypatch.setattr(Template, "_image_inputs", no_encode)
    ds_lengths = EncodedDataset(ds, template).lengths()
    assert ds_lengths == serial
    assert row_lengths(ds, template, num_proc=2) == serial
    # a plain list: indexing a `datasets` Column costs a table lookup per element, which made the
    # packing planner take minutes on 400k rows (seen on the GPU machine)
    assert type(ds_lengths) is list and type(serial) is list


def test_too_long_and_unreadable_rows_plan_as_zero(template):
    template.set_pixels(None, None)
    rows = [load_dataset("latex-ocr-sample")[i] for i in range(3)]
    rows[1] = {**rows[1], "images": [{"bytes": b"not an image", "path": None}]}
    short = Template(template.processor, "qwen2_vl", max_length=10)
    lengths = row_lengths(rows, template)
    assert lengths[0] > 10 and lengths[1] == 0 and lengths[2] > 10
    assert row_lengths(rows, short) == [0, 0, 0]


def test_encoded_dataset_keeps_nothing_in_memory_by_default(template):
    template.set_pixels(None, None)
    ds = EncodedDataset(load_dataset("latex-ocr-sample"), template)
    ds.lengths()
    ds[0]
    assert ds.cache is None  # a million-row set must not grow the main process


def test_url_images_are_planned_like_the_check_pass_reads_them(template, tmp_path):
    """A row whose image is an http URL (served here on 127.0.0.1) gets its real length, not 0."""
    import functools
    import http.server
    import threading

    template.set_pixels(None, None)
    row = load_dataset("latex-ocr-sample")[0]
    (tmp_path / "x.png").write_bytes(row["images"][0]["bytes"])
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url_row = {**row, "images": [{"bytes": None, "path": f"http://127.0.0.1:{server.server_port}/x.png"}]}
        assert row_lengths([url_row, row], template) == [row_lengths([row], template)[0]] * 2
    finally:
        server.shutdown()


def test_a_plan_with_no_trainable_row_is_an_error_not_an_endless_loop(tiny_model_dir, tmp_path):
    from ocrtune.errors import UserError
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    run = SftRun(SftArgs(model=str(tiny_model_dir), dataset=["latex-ocr-sample#8"], max_length=32, packing=True,
                         packing_tokens=512, check_dataset_strategy="none", max_steps=2, report_to=["none"],
                         output_dir=str(tmp_path), dataset_test_ratio=0.0))
    with pytest.raises(UserError, match="no training row fits"):
        run.train()


def test_a_shape_only_folder_is_never_split_over_gpus_in_one_process(tmp_path, monkeypatch):
    import torch

    from ocrtune.errors import UserError
    from ocrtune.models.presets import build_preset
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    folder = build_preset("tiny", tmp_path / "meta_tiny", meta=True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # two GPUs visible, no torchrun
    with pytest.raises(UserError, match="shape-only"):
        SftRun(SftArgs(model=str(folder), dataset=["latex-ocr-sample#8"], max_steps=1, report_to=["none"],
                       output_dir=str(tmp_path / "out"), dataset_test_ratio=0.0))
