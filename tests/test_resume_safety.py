"""Resuming takes the run's own settings, and a damaged checkpoint stops with a one-line error naming
the file, exit 2, before anything is written (args.json included)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ocrtune.errors import UserError

FLAGS = ["--model", "tiny", "--dataset", "latex-ocr-sample#12", "--max_steps", "6", "--batch_size", "2", "--save_steps", "2",
         "--eval_steps", "3", "--logging_steps", "1", "--save_total_limit", "10", "--learning_rate", "2e-3",
         "--seed", "5", "--lora_dropout", "0.1", "--dataset_test_ratio", "0.2", "--report_to", "none"]


def sft(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ocrtune", "sft", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=dict(os.environ))


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished 6-step run with checkpoints 2, 4 and 6 (lr 2e-3, not the preset's default 1e-3)."""
    out = tmp_path_factory.mktemp("run")
    res = sft(*FLAGS, "--output_dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return next((out / "tiny").glob("v*-*"))


def stopped_at(run: Path, tmp_path: Path, step: int) -> Path:
    """A copy of the run as it stood when its checkpoint-<step> was the newest (a kill after that save)."""
    out = tmp_path / "out"
    copy = out / "tiny" / run.name
    shutil.copytree(run, copy)
    for ckpt in copy.glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return copy


def test_resume_last_alone_takes_the_runs_settings(run, tmp_path):
    copy = stopped_at(run, tmp_path, 2)
    saved = (copy / "args.json").read_text()
    res = sft("--resume_from_checkpoint", "last", "--output_dir", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"with the run's settings from {copy / 'args.json'}" in res.stderr
    assert not (copy / "checkpoint-8").exists()  # stopped at the run's --max_steps 6, not at the default epochs
    args = json.loads((copy / "args.json").read_text())
    assert args == {**json.loads(saved), "resume_from_checkpoint": "last", "output_dir": str(tmp_path / "out")}
    ref, got = load_file(run / "checkpoint-6" / "adapter_model.safetensors"), load_file(copy / "checkpoint-6" / "adapter_model.safetensors")
    assert all(torch.equal(ref[k], got[k]) for k in ref)  # same lr and schedule: the same weights
    lrs = lambda d: [r["learning_rate"] for r in map(json.loads, (d / "logging.jsonl").read_text().splitlines()) if "loss" in r]
    assert lrs(copy) == lrs(run)


def test_resume_may_change_logging_but_not_the_updates(run, tmp_path):
    copy = stopped_at(run, tmp_path, 4)
    saved = (copy / "args.json").read_text()
    res = sft("--resume_from_checkpoint", str(copy / "checkpoint-4"), "--learning_rate", "5e-3", "--max_steps", "6")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "--learning_rate 0.005 (run: 0.002)" in res.stderr and "--max_steps" not in res.stderr  # same value: fine
    assert (copy / "args.json").read_text() == saved
    res = sft("--resume_from_checkpoint", str(copy), "--logging_steps", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "changed: --logging_steps 2" in res.stderr
    assert json.loads((copy / "args.json").read_text())["logging_steps"] == 2


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path):
    p.write_bytes(os.urandom(4096))


def _bad_json(p: Path):
    p.write_text('{"global_step": 4, "epoch"')


def _wrong_shape(p: Path):  # a whole file, but of another run (other parameter count)
    torch.save({"state": {}, "param_groups": [{"params": [0]}]}, p)


DAMAGE = [("adapter_model.safetensors", _truncate), ("adapter_model.safetensors", _garbage),
          ("optimizer.pt", _garbage), ("optimizer.pt", _truncate), ("optimizer.pt", _wrong_shape),
          ("scheduler.pt", _truncate), ("rng_state.pt", _garbage), ("trainer_state.json", _bad_json)]


@pytest.mark.parametrize("name,damage", DAMAGE, ids=[f"{n}-{d.__name__[1:]}" for n, d in DAMAGE])
def test_damaged_checkpoint_file_is_named_and_changes_nothing(run, tmp_path, name, damage):
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    copy = stopped_at(run, tmp_path, 4)
    damage(copy / "checkpoint-4" / name)
    saved = (copy / "args.json").read_text()
    log = (copy / "logging.jsonl").read_text()
    with pytest.raises(UserError) as e:
        SftRun(SftArgs(resume_from_checkpoint="last", output_dir=str(tmp_path / "out")))
    msg = str(e.value)
    assert f"checkpoint file {copy / 'checkpoint-4' / name} is damaged" in msg
    assert f"use the previous checkpoint {copy / 'checkpoint-2'}" in msg and "\n" not in msg
    assert (copy / "args.json").read_text() == saved and (copy / "logging.jsonl").read_text() == log


def test_damaged_checkpoint_exits_2_in_sft_infer_and_export(run, tmp_path):
    copy = stopped_at(run, tmp_path, 4)
    _truncate(copy / "checkpoint-4" / "adapter_model.safetensors")
    for cmd in (["sft", "--resume_from_checkpoint", "last", "--output_dir", str(tmp_path / "out")],
                ["infer", "--ckpt_dir", str(copy / "checkpoint-4"), "--image", "x.png"],
                ["export", "--ckpt_dir", str(copy / "checkpoint-4"), "--merge_lora", "true"]):
        res = subprocess.run([sys.executable, "-m", "ocrtune", *cmd], capture_output=True, text=True, timeout=600)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1 and err[0].startswith("error: checkpoint file "), (cmd, res.stderr[-2000:])
        assert "adapter_model.safetensors is damaged" in err[0]


def test_damaged_full_weights_are_named(tmp_path):
    from ocrtune.checkpoint import read_resume_state
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "epoch": 0, "micro_batches_done": 2}))
    save_file({"w": torch.zeros(64, 64)}, ckpt / "model.safetensors")
    _truncate(ckpt / "model.safetensors")
    with pytest.raises(UserError, match=r"checkpoint file .*checkpoint-2/model.safetensors is damaged \(SafetensorError"):
        read_resume_state(ckpt, "full")


def test_interrupted_checkpoint_saves_are_removed(tmp_path):
    from ocrtune.checkpoint import remove_interrupted_saves
    for name in (".checkpoint-4.tmp", ".checkpoint-6.tmp", ".checkpoint-2.old", ".checkpoint-8.old", "checkpoint-2"):
        (tmp_path / name).mkdir()
    remove_interrupted_saves(tmp_path)
    # checkpoint-8 is missing: a kill between the two renames of a swap left the only copy in .old
    assert sorted(p.name for p in tmp_path.iterdir()) == [".checkpoint-8.old", "checkpoint-2"]
