"""SIGTERM and Ctrl-C (SIGINT) during training: honoured between micro-batches of a long gradient accumulation
(the group is dropped, the last completed step saved), SIGINT treated as SIGTERM (save, then stop), and a second
Ctrl-C aborting at once. The signals are sent from inside the run, at a chosen micro-batch, so the tests are exact."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# sends `sig` (`times` times, to the process or its whole group, loader workers included) as the trainer moves
# micro-batch number `at` (counted over the run) to the device; prints how many micro-batches ran, at exit
DRIVER = """
import atexit, os, signal, sys
from ocrtune.train import trainer
at, sig, times, group = int(sys.argv[1]), getattr(signal, sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "group"
calls, real = [0], trainer.to_device
def to_device(*a, **k):
    calls[0] += 1
    if calls[0] == at:
        for _ in range(times):
            os.killpg(0, sig) if group else os.kill(os.getpid(), sig)
    return real(*a, **k)
trainer.to_device = to_device
atexit.register(lambda: print(f"micro-batches run: {calls[0]}", flush=True))
from ocrtune.cli.main import main
main(sys.argv[5:])
"""
FLAGS = ["sft", "--model", "tiny", "--dataset", "latex-ocr-sample#8", "--batch_size", "2", "--dataset_test_ratio", "0",
         "--save_steps", "100", "--logging_steps", "1", "--report_to", "none", "--seed", "3"]


def run(tmp_path: Path, at: int, sig: str, *flags: str, times: int = 1, group: bool = False):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [sys.executable, str(driver), str(at), sig, str(times), "group" if group else "self", *FLAGS,
           "--output_dir", str(tmp_path / "out"), *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, start_new_session=True)


def run_dir(tmp_path: Path) -> Path:
    return next((tmp_path / "out" / "tiny").glob("v*-*"))


def test_sigterm_inside_a_huge_gradient_accumulation_stops_at_the_next_micro_batch(tmp_path, tiny_model_dir):
    """--gradient_accumulation_steps 65536 (the most allowed): a group is a whole epoch (2 micro-batches of 4 rows). SIGTERM during
    the 1st micro-batch of step 2: the run stops before the 2nd (it used to finish the group), drops the group,
    saves step 1 (no save step) with the data position at step 2's start, and exits 143."""
    r = run(tmp_path, 3, "SIGTERM", "--gradient_accumulation_steps", "65536", "--num_train_epochs", "2",
            "--batch_size", "4")
    assert r.returncode == 143, r.stderr[-3000:]
    assert "micro-batches run: 3" in r.stdout
    rd = run_dir(tmp_path)
    assert f"stopped by SIGTERM at step 1; saved {rd / 'checkpoint-1'}; resume with --resume_from_checkpoint last" \
        in r.stderr
    state = json.loads((rd / "checkpoint-1" / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["micro_batches_done"]) == (1, 1, 0)
    assert not (rd / "checkpoint-2").exists()


def test_ctrl_c_saves_the_step_then_stops(tmp_path, tiny_model_dir):
    """Ctrl-C reaches the whole process group (loader workers too): the run finishes step 2, saves it although 2 is
    no save step, says so and exits 130 (it used to print 'resume with ...' having saved nothing)."""
    r = run(tmp_path, 2, "SIGINT", "--max_steps", "4", "--dataloader_num_workers", "2", group=True)
    assert r.returncode == 130, r.stderr[-3000:]
    rd = run_dir(tmp_path)
    assert f"stopped by SIGINT at step 2; saved {rd / 'checkpoint-2'}; resume with --resume_from_checkpoint last" \
        in r.stderr
    assert json.loads((rd / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert "micro-batches run: 2" in r.stdout and "Traceback" not in r.stderr


def test_a_second_ctrl_c_aborts_at_once(tmp_path, tiny_model_dir):
    r = run(tmp_path, 2, "SIGINT", "--max_steps", "4", times=2)
    assert r.returncode == 130, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == \
        "error: interrupted; resume a training run with --resume_from_checkpoint last"
    assert not list(run_dir(tmp_path).glob("checkpoint-*"))  # nothing was saved: it did not wait for step 2's end
    assert "Traceback" not in r.stderr
