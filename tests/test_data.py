"""Dataset loading (every format), the registry, name#N sampling, splits and check strategies."""
from __future__ import annotations

import io
import json

import datasets
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ocrtune.data.checks import check_dataset
from ocrtune.data.loading import load_dataset, split_validation
from ocrtune.data.registry import OCR_PROMPT, SAMPLE_DIR, register_dataset, DATASETS, latex_ocr_preprocess
from ocrtune.errors import UserError


def sample_rows(n=6):
    return pq.read_table(SAMPLE_DIR / "train.parquet").slice(0, n).to_pylist()


def write_pngs(tmp_path, rows):
    paths = []
    for i, r in enumerate(rows):
        p = tmp_path / f"img{i}.png"
        p.write_bytes(r["image"]["bytes"])
        paths.append(p.name)
    return paths


def expect_canonical(ds, rows):
    assert len(ds) == len(rows)
    for got, row in zip(ds, rows):
        assert got["messages"][-1] == {"role": "assistant", "content": row["text"]}
        assert got["messages"][0]["role"] == "user"
        assert len(got["images"]) == 1
        from ocrtune.data.images import open_image
        assert open_image(got["images"][0]).size == Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB").size


def test_bundled_sample_has_print_and_handwriting():
    ds = load_dataset("latex-ocr-sample")
    assert 200 <= len(ds) <= 400
    assert ds[0]["messages"][0]["content"] == "<image>" + OCR_PROMPT
    val = load_dataset("latex-ocr-sample", split="validation")
    assert 20 <= len(val) <= 60


@pytest.mark.parametrize("split", ["train", "validation"])
def test_the_samples_print_and_handwrite_subsets_split_it(split):
    """latex-ocr-sample-print and -handwrite are the sample's two kinds of rows: disjoint, together the whole."""
    answers = lambda name: [r["messages"][-1]["content"] for r in load_dataset(name, split=split)]
    whole, printed, written = answers("latex-ocr-sample"), answers("latex-ocr-sample-print"), \
        answers("latex-ocr-sample-handwrite")
    assert printed + written == whole and len(written) == {"train": 96, "validation": 16}[split]


def test_the_samples_handwrite_rows_are_handwriting(shared_data):
    """Against the real data: every row of latex-ocr-sample-handwrite is a LaTeX_OCR handwrite formula, and no row
    of latex-ocr-sample-print is."""
    hand = {t for f in ("train", "validation")
            for t in pq.read_table(shared_data / "handwrite" / f"{f}.parquet", columns=["text"]).column("text").to_pylist()}
    for split in ("train", "validation"):
        assert all(r["messages"][-1]["content"] in hand for r in load_dataset("latex-ocr-sample-handwrite", split=split))
        assert not any(r["messages"][-1]["content"] in hand for r in load_dataset("latex-ocr-sample-print", split=split))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "arrow"])
def test_query_response_files_with_image_paths(tmp_path, fmt):
    rows = sample_rows()
    names = write_pngs(tmp_path, rows)
    recs = [{"query": "<image>" + OCR_PROMPT, "response": r["text"], "images": [n]} for r, n in zip(rows, names)]
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(recs))
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        datasets.Dataset.from_list([{**r, "images": r["images"][0]} for r in recs]).to_csv(str(path))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(recs).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.Dataset.from_list([{**r, "images": [str(tmp_path / n) for n in r["images"]]} for r in recs]).save_to_disk(str(path))
    expect_canonical(load_dataset(str(path)), rows)


def test_messages_layout_and_image_bytes(tmp_path):
    rows = sample_rows()
    recs = [{"messages": [{"role": "user", "content": "<image>read"}, {"role": "assistant", "content": r["text"]}],
             "images": [{"bytes": r["image"]["bytes"], "path": None}]} for r in rows]
    path = tmp_path / "m.parquet"
    datasets.Dataset.from_list(recs).to_parquet(str(path))
    expect_canonical(load_dataset(str(path)), rows)


def test_shared_latex_ocr_parquet_files(shared_data):
    for sub in ("print", "handwrite"):
        f = shared_data / sub / "validation.parquet"
        rows = pq.read_table(f).slice(0, 5).to_pylist()
        ds = load_dataset(str(f) + "#5", seed=0)
        assert len(ds) == 5
        texts = {r["text"] for r in pq.read_table(f).to_pylist()}
        assert all(r["messages"][-1]["content"] in texts for r in ds)
        assert rows


def test_hub_registry_entry_reads_a_local_copy_of_the_hub_layout(tmp_path):
    """latex-ocr-* entries call datasets.load_dataset(hub_id, name=subset): point one at a local
    folder laid out like the linxy/LaTeX_OCR repo (configs in README.md) and load it the same way."""
    repo = tmp_path / "LaTeX_OCR"
    for subset in ("full", "synthetic_handwrite"):
        (repo / subset).mkdir(parents=True)
        pq.write_table(pq.read_table(SAMPLE_DIR / "train.parquet").slice(0, 8), repo / subset / "train-00000-of-00001.parquet")
        pq.write_table(pq.read_table(SAMPLE_DIR / "validation.parquet").slice(0, 4), repo / subset / "validation-00000-of-00001.parquet")
    (repo / "README.md").write_text("---\nconfigs:\n" + "".join(
        f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train-*\n  - split: validation\n    path: {s}/validation-*\n"
        for s in ("full", "synthetic_handwrite")) + "---\n")
    spec = DATASETS["latex-ocr-print"]
    try:
        register_dataset("latex-ocr-print", str(repo), spec.ms_id, subsets=spec.subsets, splits=spec.splits,
                         preprocess=latex_ocr_preprocess, val_split="validation")
        train = load_dataset("latex-ocr-print")
        val = load_dataset("latex-ocr-print", split="validation")
    finally:
        DATASETS["latex-ocr-print"] = spec
    assert len(train) == 8 and len(val) == 4
    assert train[0]["messages"][-1]["content"] == pq.read_table(SAMPLE_DIR / "train.parquet").slice(0, 1).to_pylist()[0]["text"]


def test_name_hash_n_samples_rows_reproducibly():
    a = load_dataset("latex-ocr-sample#20", seed=1)
    b = load_dataset("latex-ocr-sample#20", seed=1)
    assert len(a) == 20 and a["messages"] == b["messages"]


def test_split_validation_ratio():
    ds = load_dataset("latex-ocr-sample")
    train, val = split_validation(ds, 0.1, seed=0)
    assert len(val) == round(len(ds) * 0.1) and len(train) + len(val) == len(ds)


def test_unknown_names_and_bad_columns(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'nope'"):
        load_dataset("nope")
    with pytest.raises(UserError, match="dataset file not found"):
        load_dataset("./missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x", "answer": "y"}) + "\n")
    with pytest.raises(UserError, match=r"columns \['answer', 'question'\]"):
        load_dataset(str(bad))


def broken_dataset(tmp_path):
    rows = sample_rows(4)
    names = write_pngs(tmp_path, rows)
    (tmp_path / "img1.png").write_bytes(b"not a png at all")
    recs = [{"query": "<image>" + OCR_PROMPT, "response": r["text"], "images": [n]} for r, n in zip(rows, names)]
    recs[2]["images"] = ["missing.png"]
    recs[3]["response"] = ""
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return load_dataset(str(path))


def test_check_strategies_on_broken_rows(tmp_path, caplog):
    ds = broken_dataset(tmp_path)
    assert len(check_dataset(ds, "none")) == 4
    with pytest.raises(UserError, match="row 1 of .*not a readable image"):
        check_dataset(ds, "error", "broken.jsonl")
    kept = check_dataset(ds, "discard")
    assert len(kept) == 1 and kept[0]["messages"] == ds[0]["messages"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="ocrtune"):
        kept = check_dataset(ds, "warning")
    assert len(kept) == 1
    text = caplog.text
    assert "row 1" in text and "row 2" in text and "row 3" in text and "not found" in text and "empty response" in text


def test_dataset_that_loses_every_row_says_so(tmp_path):
    ds = broken_dataset(tmp_path).select([1, 2, 3])
    with pytest.raises(UserError, match="no usable rows left"):
        check_dataset(ds, "discard")


def test_warnings_name_the_files_row_after_a_shuffled_split(tmp_path, caplog):
    """Row 6 of the file is bad; after the seeded validation split it sits elsewhere, and the
    messages still call it row 6 (the file's row), never its shuffled position."""
    rows = sample_rows(10)
    names = write_pngs(tmp_path, rows)
    recs = [{"query": "<image>" + OCR_PROMPT, "response": r["text"], "images": [n]} for r, n in zip(rows, names)]
    recs[6]["images"] = ["missing.png"]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    train, val = split_validation(load_dataset(str(path)), 0.3, seed=0)
    part = train if any("missing.png" in (im["path"] or "") for r in train for im in r["images"]) else val
    where = next(i for i, r in enumerate(part) if "missing.png" in (r["images"][0]["path"] or ""))
    assert where != 6  # the shuffle moved it: a message naming `where` would point at the wrong file row
    with pytest.raises(UserError, match=r"^row 6 of d\.jsonl: image file not found"):
        check_dataset(part, "error", "d.jsonl")
    with caplog.at_level("WARNING", logger="ocrtune"):
        check_dataset(part, "warning", "d.jsonl")
    assert "row 6 of d.jsonl" in caplog.text and f"row {where} of" not in caplog.text


def test_rows_over_max_length_are_counted_in_the_summary(tiny_model_dir, caplog):
    """A row longer than --max_length is dropped before training and counted in 'dropped N of M
    rows', under every strategy but none; under error it is dropped, not fatal."""
    from ocrtune.data.images import open_image
    from ocrtune.models.loading import load_processor
    from ocrtune.models.template import Template
    ds = load_dataset("latex-ocr-sample#40", seed=3)
    template = Template(load_processor(tiny_model_dir))
    lengths = [len(template.encode(r["messages"], [open_image(i) for i in r["images"]])["input_ids"]) for r in ds]
    template.max_length = sorted(lengths)[len(lengths) // 2]  # the median: some rows are longer
    n_long = sum(n > template.max_length for n in lengths)
    assert 0 < n_long < len(ds)
    for strategy in ("warning", "discard", "error"):
        caplog.clear()
        with caplog.at_level("WARNING", logger="ocrtune"):
            kept = check_dataset(ds, strategy, "s", template=template)
        assert len(kept) == len(ds) - n_long
        assert f"s: dropped {n_long} of {len(ds)} rows (longer than --max_length: {n_long})" in caplog.text
    assert len(check_dataset(ds, "none", "s", template=template)) == len(ds)


def test_own_validation_split_by_default_and_the_ratio_when_given():
    from ocrtune.data.loading import validation_data
    train = load_dataset("latex-ocr-sample")
    own = load_dataset("latex-ocr-sample", split="validation")
    t, v = validation_data(train, ["latex-ocr-sample"], None, None)
    assert len(t) == len(train) and v["messages"] == own["messages"]  # all 288 train, the 40 validation rows
    t, v = validation_data(train, ["latex-ocr-sample"], None, 0.1)  # an explicit ratio is kept
    assert len(v) == round(len(train) * 0.1) and len(t) + len(v) == len(train)
    files = load_dataset(str(SAMPLE_DIR / "train.parquet"))  # a file has no validation split: 1% is split off
    t, v = validation_data(files, [str(SAMPLE_DIR / "train.parquet")], None, None)
    assert len(v) == 3 and len(t) == len(files) - 3


def test_infer_load_dataset_config_rebuilds_the_own_validation_split():
    """`ocrtune infer/eval --load_dataset_config true` rebuilds what sft used: a run saved with the new
    default (dataset_test_ratio None) evaluated on the dataset's own 40 rows; an older args.json
    without the key keeps the 0.01 split."""
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.dataset import load_eval_rows
    own = load_dataset("latex-ocr-sample", split="validation")
    rows, label = load_eval_rows(InferArgs(load_dataset_config=True),
                                 {"run_args": {"dataset": ["latex-ocr-sample#8"], "dataset_test_ratio": None}})
    assert rows["messages"] == own["messages"] and label == "validation split of latex-ocr-sample#8"
    rows, label = load_eval_rows(InferArgs(load_dataset_config=True), {"run_args": {"dataset": ["latex-ocr-sample#8"]}})
    assert len(rows) == 1 and "ratio 0.01" in label


def test_size_rejections_are_counted_by_kind_in_the_summary(tmp_path, caplog):
    """Two 300000x1 PNGs with different names: one 'aspect ratio' count, not one entry per file."""
    import io
    import json

    from PIL import Image
    lines = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.png"
        Image.new("L", (300_000, 1), 255).save(path)
        lines.append({"query": "<image>read", "response": "x", "images": [str(path)]})
    good = io.BytesIO()
    Image.new("RGB", (64, 32), "white").save(good, format="PNG")
    (tmp_path / "g.png").write_bytes(good.getvalue())
    lines.append({"query": "<image>read", "response": "y", "images": [str(tmp_path / "g.png")]})
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    ds = load_dataset(str(tmp_path / "d.jsonl"))
    with caplog.at_level("WARNING", logger="ocrtune"):
        kept = check_dataset(ds, "discard", "d.jsonl")
    assert len(kept) == 1
    assert "dropped 2 of 3 rows (aspect ratio over 200:1: 2)" in caplog.text
