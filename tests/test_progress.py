"""`infer`/`eval` progress when stderr is not a terminal: plain lines, periodically and at the end."""
from __future__ import annotations

import io

from ocrtune.infer.progress import Progress


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()  # isatty() is False, as for a log file or a pipe
    with Progress(10, "infer", every_s=0.0, stream=out) as p:
        for _ in range(5):
            p.update(2)
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"infer: {n}/10 rows" for n in (2, 4, 6, 8, 10)]
    assert lines[-1].startswith("infer: 10/10 rows (100%)") and "left" not in lines[-1]
    out = io.StringIO()
    with Progress(10, "infer", every_s=3600, stream=out) as p:
        for _ in range(5):
            p.update(2)
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[-1]]  # only the final line
    assert out.getvalue().startswith("infer: 10/10 rows (100%)")


def test_infer_over_a_dataset_reports_progress_on_a_non_terminal(tiny_model_dir, tmp_path, capfd, monkeypatch):
    from ocrtune.infer import cli, dataset
    from ocrtune.infer.args import InferArgs
    monkeypatch.setattr(dataset, "PROGRESS_EVERY_S", 0.0)  # run_dataset reads it from infer/dataset.py
    cli.run_infer(InferArgs(model=str(tiny_model_dir), val_dataset=["latex-ocr-sample#3"], infer_batch_size=1,
                            max_new_tokens=2, result_path=str(tmp_path / "r.jsonl")))
    err = capfd.readouterr().err
    assert [line.split(" (")[0] for line in err.splitlines() if line.startswith("infer: ")] == \
        ["infer: 1/3 rows", "infer: 2/3 rows", "infer: 3/3 rows"]
