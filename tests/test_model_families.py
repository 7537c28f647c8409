"""Qwen2.5-VL and Qwen3-VL train, save and generate through the same path as Qwen2-VL."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ocrtune.train.args import SftArgs
from ocrtune.train.trainer import SftRun


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_family_trains_and_generates(arch, tmp_path, tiny_model_dir):
    from families import build
    from ocrtune.models.generate import InferEngine
    from ocrtune.data.loading import load_dataset

    model_dir = build(arch, str(tmp_path / arch))
    args = SftArgs(model=model_dir, dataset=["latex-ocr-sample#8"], dataset_test_ratio=0, max_steps=30,
                   learning_rate=5e-3, logging_steps=1, eval_steps=100, output_dir=str(tmp_path / "out"), lora_rank=16)
    run = SftRun(args)
    assert run.template.template == arch
    result = run.train()
    log = [json.loads(l) for l in (Path(result["run_dir"]) / "logging.jsonl").read_text().splitlines() if '"loss"' in l]
    assert log[-1]["loss"] < 0.8 * log[0]["loss"]
    assert (Path(result["last_model_checkpoint"]) / "adapter_model.safetensors").exists()
    rows = load_dataset("latex-ocr-sample#2")
    model = run.accelerator.unwrap_model(run.loss_module).model
    preds = InferEngine(model, run.processor, run.template).generate_rows(rows, batch_size=2, max_new_tokens=8)
    assert len(preds) == 2 and all(isinstance(p, str) for p in preds)
