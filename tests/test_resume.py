"""A run killed with SIGKILL (mid-training or mid-save) resumes to bit-identical adapter weights,
the same logging.jsonl and the same data order as an uninterrupted run."""
from __future__ import annotations

import json
import math
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS = 12
FLAGS = ["--model", "tiny", "--dataset", "latex-ocr-sample#24", "--max_steps", str(STEPS), "--batch_size", "2", "--save_steps", "2",
         "--eval_steps", "4", "--logging_steps", "1", "--save_total_limit", "2", "--seed", "3",
         "--lora_dropout", "0.1", "--dataset_test_ratio", "0.1", "--report_to", "none"]
COMPARED = ("loss", "token_acc", "grad_norm", "learning_rate", "eval_loss", "eval_acc", "step")


def sft(out: Path, *extra, slow_save=None):
    import faults
    argv = ["sft", *FLAGS, "--output_dir", str(out), *extra]
    cmd = faults.command(*argv, slow_save=slow_save) if slow_save else [sys.executable, "-m", "ocrtune", *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def run_dir(out: Path) -> Path:
    return next((out / "tiny").glob("v*-*"))


def final_state(out: Path):
    rd = run_dir(out)
    weights = load_file(rd / f"checkpoint-{STEPS}" / "adapter_model.safetensors")
    log = [{k: r[k] for k in COMPARED if k in r} for r in map(json.loads, (rd / "logging.jsonl").read_text().splitlines())]
    return weights, log


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(sft(out))
    return final_state(out)


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def logged_steps(out: Path) -> int:
    try:
        lines = (run_dir(out) / "logging.jsonl").read_text().splitlines()
        return max((json.loads(l)["step"] for l in lines if l.strip()), default=0)
    except (StopIteration, FileNotFoundError, json.JSONDecodeError):
        return 0


def assert_same(reference, out):
    ref_w, ref_log = reference
    w, log = final_state(out)
    assert ref_w.keys() == w.keys()
    for k in ref_w:
        assert (ref_w[k] == w[k]).all(), f"{k} differs after resume"
    assert log == ref_log


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_mid_training_then_resume_is_bit_identical(reference, tmp_path, seed):
    kill_at = random.Random(seed).randint(3, STEPS - 2)
    proc = sft(tmp_path)
    wait_for(lambda: logged_steps(tmp_path) >= kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert logged_steps(tmp_path) < STEPS
    finish(sft(tmp_path, "--resume_from_checkpoint", "last"))
    assert_same(reference, tmp_path)


def test_sigterm_to_the_process_group_saves_the_step_it_stopped_after_and_resume_is_bit_identical(reference, tmp_path):
    """SIGTERM to the whole process group (`timeout`, Slurm, torchrun's shutdown), loader workers included, during
    step 5: the run finishes that step, saves it although 5 is no save step (--save_steps 2) and exits 143 with the
    one-line message; resuming completes the run as if it had never stopped."""
    import faults
    cmd = faults.command("sft", *FLAGS, "--output_dir", str(tmp_path), "--dataloader_num_workers", "2",
                         sigterm_at_step=5)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    rd = run_dir(tmp_path)
    assert f"stopped by SIGTERM at step 5; saved {rd / 'checkpoint-5'}; resume with --resume_from_checkpoint last" in err
    state = json.loads((rd / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and logged_steps(tmp_path) == 5
    finish(sft(tmp_path, "--resume_from_checkpoint", "last"))
    assert_same(reference, tmp_path)


def test_max_time_stops_after_the_step_in_progress_saves_it_and_resume_is_bit_identical(reference, tmp_path):
    """--max_time 0: the time is up as soon as the first step ends, so the run stops after step 1 (no save step),
    saves it, says so and exits 0 with its schedule unfinished; the resumed run does not inherit the limit (it is
    the stopped process's) and completes the run as if it had never stopped."""
    proc = sft(tmp_path, "--max_time", "0")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    rd = run_dir(tmp_path)
    assert f"stopped at --max_time 0s at step 1; saved {rd / 'checkpoint-1'}; resume with --resume_from_checkpoint last" in err
    assert f"last_model_checkpoint: {rd / 'checkpoint-1'}" in out
    state = json.loads((rd / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["global_step"] == 1 and logged_steps(tmp_path) == 1
    finish(sft(tmp_path, "--resume_from_checkpoint", "last"))
    assert json.loads((rd / "args.json").read_text())["max_time"] is None
    assert_same(reference, tmp_path)


def test_sigkill_during_save_keeps_previous_checkpoint(reference, tmp_path):
    proc = sft(tmp_path, slow_save=30)
    wait_for(lambda: any(run_dir(tmp_path).glob(".checkpoint-4.tmp")) if (tmp_path / "tiny").exists() else False, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rd = run_dir(tmp_path)
    assert (rd / "checkpoint-2" / "trainer_state.json").exists()  # the previous checkpoint is intact
    assert not (rd / "checkpoint-4").exists()
    finish(sft(tmp_path, "--resume_from_checkpoint", "last"))
    assert not list(rd.glob(".checkpoint-*"))  # leftovers cleaned by the later saves
    assert_same(reference, tmp_path)




# ---- packing: micro-batches per epoch differ, so the saved position must follow each epoch's own plan

PACKED = dict(model="tiny", dataset=["latex-ocr-sample#24"], packing=True, packing_tokens=300, num_train_epochs=3, seed=3,
              dataset_test_ratio=0.1, save_steps=5, eval_steps=12, logging_steps=1, lora_dropout=0.1,
              save_total_limit=2, report_to=["none"])


class Killed(Exception):
    """Stands in for SIGKILL: raised before an optimizer step, after the last checkpoint was written."""


def _packed_run(out: Path, kill_before_step: int | None = None, **extra):
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    run = SftRun(SftArgs(output_dir=str(out), **PACKED, **extra))
    if kill_before_step is not None:  # test-only seam: the instance's train_step dies at that step
        step_fn = run.train_step

        def dying_step(group):
            if run.state["global_step"] + 1 == kill_before_step:
                raise Killed
            return step_fn(group)
        run.train_step = dying_step
    return run


def test_packed_epochs_resume_bit_identical_from_a_longer_than_first_epoch(tmp_path, tiny_model_dir):
    ref_run = _packed_run(tmp_path / "ref")
    sizes = [ref_run.micro_per_epoch(e) for e in range(3)]
    assert sizes == [11, 12, 13], sizes  # the data this test needs: later epochs longer than the first
    assert ref_run.total_steps == sum(sizes)  # not 3 x epoch 0's count (33): the last epoch would end short
    ref_run.train()
    ref = final_state_at(tmp_path / "ref", sum(sizes))
    # step 35 is micro-batch 12 of epoch 2, past epoch 0's 11: the position it saves must say so
    run = _packed_run(tmp_path / "killed", kill_before_step=36)
    with pytest.raises(Killed):
        run.train()
    rd = run_dir(tmp_path / "killed")
    state = json.loads((rd / "checkpoint-35" / "trainer_state.json").read_text())
    assert (state["epoch"], state["micro_batches_done"]) == (2, 12)
    _packed_run(tmp_path / "killed", resume_from_checkpoint="last").train()
    w, log = final_state_at(tmp_path / "killed", sum(sizes))
    assert ref[0].keys() == w.keys()
    for k in w:
        assert torch.equal(ref[0][k], w[k]), f"{k} differs after resume"
    assert log == ref[1]
    epochs = [r["epoch"] for r in log if "loss" in r]
    assert epochs[sizes[0] - 1] == 1.0 and epochs[sizes[0] + sizes[1] - 1] == 2.0 and epochs[-1] == 3.0


def final_state_at(out: Path, step: int):
    rd = run_dir(out)
    weights = load_file(rd / f"checkpoint-{step}" / "adapter_model.safetensors")
    log = [{k: r[k] for k in (*COMPARED, "epoch") if k in r}
           for r in map(json.loads, (rd / "logging.jsonl").read_text().splitlines())]
    return weights, log


def test_time_decay_is_one_then_a_cosine_that_ends_at_max_time():
    from ocrtune.train.schedule import time_decay
    # decay over the last 40 s of 100, the first step ended at 5 s
    assert time_decay(10, 100, 40, 5) == 1.0 and time_decay(60, 100, 40, 5) == 1.0
    assert time_decay(70, 100, 40, 5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 40)))
    assert time_decay(80, 100, 40, 5) == pytest.approx(0.5)
    assert time_decay(100, 100, 40, 5) == 0.0 and time_decay(130, 100, 40, 5) == 0.0
    # more decay than time left after the first step: it starts at the first step (30 s), not before
    assert time_decay(30, 100, 100, 30) == 1.0
    assert time_decay(65, 100, 100, 30) == pytest.approx(0.5)


def test_lr_decay_seconds_anneals_by_the_clock_and_ends_the_run_there(tmp_path):
    """A warm-up/stable/decay run planned by time: the first process trains at the constant rate and is stopped by
    --max_time (saved, to be resumed); the resumed process decays the rate to ~0 over its --lr_decay_seconds and
    ends by the clock, long before --max_steps, as at a last step: evaluated, saved, exit 0."""
    flags = ["--max_steps", "100000", "--lr_scheduler_type", "constant", "--warmup_steps", "2", "--save_steps", "100000",
             "--eval_steps", "100000"]
    proc = sft(tmp_path, *flags, "--max_time", "0")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "stopped at --max_time 0s at step 1" in err, err[-3000:]
    rd = run_dir(tmp_path)
    proc = sft(tmp_path, *flags, "--resume_from_checkpoint", "last", "--max_time", "14", "--lr_decay_seconds", "14")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    log = [json.loads(l) for l in (rd / "logging.jsonl").read_text().splitlines()]
    train = [r for r in log if "loss" in r]
    last = train[-1]["step"]
    assert "the learning rate decayed to 0 at --max_time 14s (--lr_decay_seconds 14): the run ends at step " \
           f"{last}" in out + err, (out + err)[-3000:]
    assert f"last_model_checkpoint: {rd / f'checkpoint-{last}'}" in out
    assert re.search(r"start-up: set-up [\d.]+ s \(data [\d.]+ s\), first batch after [\d.]+ s, first step [\d.]+ s", out)
    assert (rd / f"checkpoint-{last}" / "adapter_model.safetensors").exists()
    assert any("eval_loss" in r and r["step"] == last for r in log)  # evaluated at its end
    assert int(json.loads((rd / f"checkpoint-{last}" / "trainer_state.json").read_text())["global_step"]) == last
    peak = 1e-3  # a preset's default LoRA rate, reached after 2 warm-up steps (the first process ran step 1)
    lrs = [r["learning_rate"] for r in train[1:]]  # the resumed process's steps (2 on)
    assert len(lrs) >= 4, lrs
    assert lrs[0] == pytest.approx(peak, rel=1e-6)  # step 2 at the full rate: the decay starts after its first step
    assert all(b <= a * (1 + 1e-9) for a, b in zip(lrs, lrs[1:])), lrs  # then only falls
    assert lrs[-1] < 0.5 * peak, lrs  # the last step at a fraction of it: within a step of --max_time
    assert json.loads((rd / "args.json").read_text())["lr_decay_seconds"] == 14  # this process's, saved as given
