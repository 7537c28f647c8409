"""DDP through torchrun on CPU (gloo): two processes with half the per-device batch follow the same
loss curve as one process with the same global batch, and write one run folder from rank 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

FLAGS = ["--dataset", "latex-ocr-sample#32", "--max_steps", "5", "--lora_dropout", "0", "--logging_steps", "1",
         "--eval_steps", "5", "--dataset_test_ratio", "0.25", "--report_to", "none", "--seed", "5"]


def sft(out, batch, env=None):
    res = subprocess.run([sys.executable, "-m", "ocrtune", "sft", *FLAGS, "--batch_size", str(batch), "--output_dir", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((out / "tiny").glob("v*-*"))
    assert len(runs) == 1, runs  # rank 0 alone names and writes the run folder
    log = [json.loads(l) for l in (runs[0] / "logging.jsonl").read_text().splitlines()]
    return runs[0], log


def test_two_process_ddp_matches_one_process(tmp_path, tiny_model_dir):
    one_dir, one = sft(tmp_path / "one", 4)
    two_dir, two = sft(tmp_path / "two", 2, {"NPROC_PER_NODE": "2", "MASTER_PORT": "29533", "OMP_NUM_THREADS": "1"})
    key = lambda log, k: [r[k] for r in log if k in r]
    assert len(key(two, "loss")) == 5
    assert key(two, "loss") == pytest.approx(key(one, "loss"), rel=1e-4)
    assert key(two, "grad_norm") == pytest.approx(key(one, "grad_norm"), rel=1e-3)
    assert key(two, "eval_loss") == pytest.approx(key(one, "eval_loss"), rel=1e-4)
    a = load_file(one_dir / "checkpoint-5" / "adapter_model.safetensors")
    b = load_file(two_dir / "checkpoint-5" / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_deepspeed_configs_ship_with_the_package():
    from types import SimpleNamespace
    from ocrtune.train.distributed import deepspeed_config
    args = SimpleNamespace(batch_size=4, max_grad_norm=1.0, dtype="auto")
    for stage in (2, 3):
        cfg = deepspeed_config(f"zero{stage}", args)
        assert cfg["zero_optimization"]["stage"] == stage and cfg["train_micro_batch_size_per_gpu"] == 4
