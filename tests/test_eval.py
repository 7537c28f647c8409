"""`ocrtune eval`, and the learning test: a tiny model trained on 32 bundled rows transcribes most of
them exactly, as `ocrtune eval` reports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ocrtune.data.registry import SAMPLE_DIR

ROWS = 32
# Full fine-tuning of the language model over the frozen random ViT memorizes all 32 formulas in 300
# steps. Training the random ViT too (--freeze_vit false) collapses its features to a constant: the
# model then tells images apart only by their size and gets ~45% of the rows right; LoRA (r 32) on the
# language model gets ~55% in the same steps.
TRAIN = ["--train_type", "full", "--freeze_vit", "true", "--learning_rate", "2e-3", "--max_steps", "300",
         "--batch_size", "8", "--eval_steps", "300", "--gradient_checkpointing", "false", "--dataset_test_ratio", "0",
         "--report_to", "none", "--save_total_limit", "1"]


def cli(*argv, cwd, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "ocrtune", *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def data32(tmp_path_factory) -> Path:
    import pyarrow.parquet as pq
    path = tmp_path_factory.mktemp("data") / "latex32.parquet"
    pq.write_table(pq.read_table(SAMPLE_DIR / "train.parquet").slice(0, ROWS), path)
    return path


@pytest.fixture(scope="module")
def memorized(tiny_model_dir, data32, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("learn")
    res = cli("sft", "--model", str(tiny_model_dir), "--dataset", str(data32), "--val_dataset", str(data32),
              "--output_dir", str(out), *TRAIN, cwd=out)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpts = sorted(out.glob("*/v*/checkpoint-*"))
    assert ckpts, res.stdout[-2000:]
    return ckpts[-1]


def parse_table(stdout: str) -> dict:
    values = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return values


def test_learning_32_rows(memorized, data32, tmp_path):
    """`ocrtune eval` on the run's own data (its --val_dataset: the same 32 rows it trained on)."""
    res = cli("eval", "--ckpt_dir", str(memorized), "--metrics", "bleu,edit_distance,exact_match,token_acc,render",
              "--infer_batch_size", str(ROWS), "--max_new_tokens", "170", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    print(res.stdout)  # shown with pytest -s: the table the README quotes
    table = parse_table(res.stdout)
    assert table["count"] == ROWS and table["failed_rows"] == 0
    assert table["exact_match"] >= 0.75, res.stdout
    assert table["token_acc"] >= 0.97 and table["bleu4"] >= 0.8 and table["edit_distance_token"] <= 0.15, res.stdout
    assert table["render_match"] >= 0.6, res.stdout
    summary_path = Path(res.stdout.split("summary: ")[1].split()[0])
    summary = json.loads(summary_path.read_text())
    assert summary["exact_match"] == pytest.approx(table["exact_match"], abs=1e-4)
    assert summary["dataset"] == str(data32)
    rows = [json.loads(line) for line in Path(summary["result_path"]).read_text().splitlines()]
    assert len(rows) == ROWS
    assert sum(r["exact_match"] for r in rows) == round(summary["exact_match"] * ROWS)
    assert all(r["render"] in ("match", "differ", "pred_fails", "ref_fails") for r in rows)
    assert Path(summary["result_path"]).parent == memorized / "infer_result"


def test_untrained_model_gets_nothing_right(tiny_model_dir, data32, tmp_path, capsys):
    """The same eval on the random base model: the learning test's numbers come from training."""
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.cli import run_eval
    summary = run_eval(InferArgs(model=str(tiny_model_dir), dataset=[str(data32) + "#8"], infer_batch_size=8,
                                 max_new_tokens=8, metrics="exact_match,bleu", result_path=str(tmp_path / "r.jsonl")))
    out = capsys.readouterr().out
    assert summary["count"] == 8 and summary["exact_match"] == 0.0 and summary["bleu4"] < 0.05
    assert "exact_match" in out and (tmp_path / "r_summary.json").exists()


def test_eval_needs_data(tiny_model_dir):
    from ocrtune.errors import UserError
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.cli import run_eval
    with pytest.raises(UserError, match="needs data"):
        run_eval(InferArgs(model=str(tiny_model_dir)))
    with pytest.raises(UserError, match="unknown metric"):
        run_eval(InferArgs(model=str(tiny_model_dir), dataset=["latex-ocr-sample#2"], metrics="bleu,cer"))
