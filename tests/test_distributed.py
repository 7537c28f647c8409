"""DDP through torchrun on CPU (gloo): two processes with half the per-device batch follow the same
loss curve as one process with the same global batch, and write one run folder from rank 0."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

FLAGS = ["--model", "tiny", "--dataset", "latex-ocr-sample#32", "--max_steps", "5", "--lora_dropout", "0", "--logging_steps", "1",
         "--eval_steps", "5", "--dataset_test_ratio", "0.25", "--report_to", "none", "--seed", "5"]


def free_port() -> str:
    """A port nobody listens on now (fixed ports collide with parallel test runs on the same host)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def sft(out, batch, env=None, extra=()):
    cmd = [sys.executable, "-m", "ocrtune", "sft", *FLAGS, "--batch_size", str(batch), "--output_dir", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    if res.returncode and "exitcode: -11" in res.stderr and "--resume_from_checkpoint" not in extra:
        # a rank died of SIGSEGV inside gloo on the 2-core CI machine (once in ~100 CPU FSDP2 runs, never
        # reproduced): run it once more from nothing; any other failure, or a second crash, fails the test
        shutil.rmtree(out, ignore_errors=True)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((out / "tiny").glob("v*-*"))
    assert len(runs) == 1, runs  # rank 0 alone names and writes the run folder
    log = [json.loads(l) for l in (runs[0] / "logging.jsonl").read_text().splitlines()]
    return runs[0], log


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    """The reference: one process, batch 4 (shared by the DDP and two-node tests)."""
    return sft(tmp_path_factory.mktemp("one"), 4)


SAVES = ["--save_steps", "2", "--save_total_limit", "3"]


def two_ranks() -> dict:
    return {"NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_model_dir):
    """DDP, two processes of batch 2, saving at steps 2, 4 and 5, all kept (shared by the DDP and FSDP2 tests)."""
    return sft(tmp_path_factory.mktemp("two"), 2, two_ranks(), SAVES)


def test_two_process_ddp_matches_one_process(one_process, two_processes):
    one_dir, one = one_process
    two_dir, two = two_processes
    key = lambda log, k: [r[k] for r in log if k in r]
    assert len(key(two, "loss")) == 5
    assert key(two, "loss") == pytest.approx(key(one, "loss"), rel=1e-4)
    assert key(two, "grad_norm") == pytest.approx(key(one, "grad_norm"), rel=1e-3)
    assert key(two, "eval_loss") == pytest.approx(key(one, "eval_loss"), rel=1e-4)
    a = load_file(one_dir / "checkpoint-5" / "adapter_model.safetensors")
    b = load_file(two_dir / "checkpoint-5" / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_relora_under_ddp_matches_one_process(tmp_path):
    """--relora_steps with two processes: every rank redraws the same adapters at each restart (seeded: a rank with
    other ones would move the logged loss, the mean over ranks, far from the one-process run's), and rank 0 saves
    the same adapters and folded base."""
    relora = ["--relora_steps", "2", "--save_steps", "1"]
    one_dir, one = sft(tmp_path / "one", 4, extra=relora)
    two_dir, two = sft(tmp_path / "two", 2, {"NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"},
                       extra=relora)
    key = lambda log, k: [r[k] for r in log if k in r]
    assert key(two, "loss") == pytest.approx(key(one, "loss"), rel=1e-4)  # steps 3-5 come after restarts
    a, b = (load_file(d / "checkpoint-4" / "adapter_model.safetensors") for d in (one_dir, two_dir))
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)  # redrawn at step 4: the same draw
    assert all(not a[k].any() and not b[k].any() for k in a if "lora_B" in k)
    for name in ("adapter_model.safetensors", "relora_base.safetensors"):
        a, b = load_file(one_dir / "checkpoint-5" / name), load_file(two_dir / "checkpoint-5" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name


def test_deepspeed_configs_ship_with_the_package():
    from types import SimpleNamespace
    from ocrtune.train.distributed import deepspeed_config
    args = SimpleNamespace(batch_size=4, max_grad_norm=1.0, dtype="auto")
    for stage in (2, 3):
        cfg = deepspeed_config(f"zero{stage}", args)
        assert cfg["zero_optimization"]["stage"] == stage and cfg["train_micro_batch_size_per_gpu"] == 4


def test_fsdp2_save_matches_ddp_and_resumes(tmp_path, two_processes):
    """FSDP2 (torch fully_shard through accelerate, gloo on CPU): the same losses as DDP, a standard
    adapter folder gathered from both ranks, and a resume from the step-2 checkpoint under 2
    processes that ends on the same weights and optimizer state as the uninterrupted run."""
    flags = [*SAVES, "--fsdp", "full_shard auto_wrap"]  # as two_processes, FSDP2
    ddp_dir, ddp = two_processes
    fsdp_dir, fsdp = sft(tmp_path / "fsdp", 2, two_ranks(), flags)
    key = lambda log, k: [r[k] for r in log if k in r]
    assert key(fsdp, "loss") == pytest.approx(key(ddp, "loss"), rel=1e-4)
    a = load_file(ddp_dir / "checkpoint-5" / "adapter_model.safetensors")
    b = load_file(fsdp_dir / "checkpoint-5" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    # resume: drop the later checkpoints, continue from checkpoint-2 under 2 processes
    full = load_file(fsdp_dir / "checkpoint-5" / "adapter_model.safetensors")
    full_opt = torch.load(fsdp_dir / "checkpoint-5" / "optimizer.pt", weights_only=True)
    for later in ("checkpoint-4", "checkpoint-5"):
        shutil.rmtree(fsdp_dir / later)
    sft(tmp_path / "fsdp", 2, two_ranks(), flags + ["--resume_from_checkpoint", "last"])
    resumed = load_file(fsdp_dir / "checkpoint-5" / "adapter_model.safetensors")
    opt = torch.load(fsdp_dir / "checkpoint-5" / "optimizer.pt", weights_only=True)
    for k in full:
        assert torch.allclose(full[k], resumed[k], atol=1e-6), k
    for name, st in full_opt["state"].items():  # Adam moments restored, not restarted (step 5, not 2)
        assert int(opt["state"][name]["step"]) == 5
        assert torch.allclose(st["exp_avg_sq"], opt["state"][name]["exp_avg_sq"], rtol=1e-5, atol=1e-12), name


def test_two_nodes_on_loopback_match_one_process(tmp_path, one_process):
    """NNODES=2 x NPROC_PER_NODE=1 on 127.0.0.1 (SWIFT's multi-node variables) = one process, same global batch."""
    one = one_process[1]
    base = {"NNODES": "2", "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ocrtune", "sft", *FLAGS, "--batch_size", "2", "--output_dir", str(tmp_path / "two")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **base, "NODE_RANK": str(r)}) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    runs = list((tmp_path / "two" / "tiny").glob("v*-*"))
    assert len(runs) == 1, runs  # node 0's rank 0 alone writes
    two = [json.loads(l) for l in (runs[0] / "logging.jsonl").read_text().splitlines()]
    key = lambda log, k: [r[k] for r in log if k in r]
    assert key(two, "loss") == pytest.approx(key(one, "loss"), rel=1e-4)


def test_multi_node_variables_build_torchrun_arguments(monkeypatch):
    from ocrtune.errors import UserError
    from ocrtune.train.launch import torchrun_args
    for k in ("LOCAL_RANK", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert torchrun_args(["ocrtune", "--x"]) is None
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    assert torchrun_args(["ocrtune", "--x"]) is None  # one process: runs as it is
    monkeypatch.setenv("NNODES", "2")
    with pytest.raises(UserError, match="MASTER_ADDR"):
        torchrun_args(["ocrtune"])
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("NODE_RANK", "1")
    args = torchrun_args(["ocrtune", "--x"])
    assert args[:5] == ["--nproc_per_node=1", "--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1", "--master_port=29500"]
    assert args[-1] == "--x"
    monkeypatch.setenv("NODE_RANK", "2")
    with pytest.raises(UserError, match="NODE_RANK=2"):
        torchrun_args(["ocrtune"])


def test_dying_rank_gives_one_error_line_naming_it(tmp_path, tiny_model_dir):
    import faults
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(faults.command("sft", *FLAGS, "--batch_size", "2", "--output_dir", str(tmp_path), nan_at_step=2),
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank ") and "exited with code 2: loss became NaN at step 2" in last, last


def test_accumulation_group_syncs_and_steps_once(tiny_model_dir, monkeypatch, tmp_path):
    """accelerate's sync_gradients is DeepSpeed's accumulation boundary (its engine steps inside
    backward when it is set): only the group's last micro-batch may have it; the optimizer steps once."""
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    run = SftRun(SftArgs(model="tiny", dataset=["latex-ocr-sample#16"], max_steps=1, batch_size=2, gradient_accumulation_steps=3,
                         report_to=["none"], output_dir=str(tmp_path), dataset_test_ratio=0.0))
    seen, steps = [], []
    backward = run.accelerator.backward
    monkeypatch.setattr(run.accelerator, "backward", lambda loss, **kw: (seen.append(run.accelerator.sync_gradients),
                                                                          backward(loss, **kw)))
    step = run.optimizer.step
    monkeypatch.setattr(run.optimizer, "step", lambda *a, **k: (steps.append(1), step(*a, **k)))
    stream = run.micro_batches()
    run.train_step([next(stream)[-1] for _ in range(3)])
    assert seen == [False, False, True] and len(steps) == 1
    assert run.accelerator.sync_gradients


def test_even_batches_give_every_rank_the_same_number_of_passes():
    from ocrtune.train.distributed import even_batches
    shares = [even_batches(5, r, 2, 2) for r in (0, 1)]
    assert [len(s) for s in shares] == [2, 2]
    real = sorted(i for s in shares for b, ok in s if ok for i in b)
    assert real == list(range(5))  # each row once
    assert shares[1] == [([1, 3], True), ([1, 3], False)]  # rank 1 (2 rows) repeats a batch, results dropped


def test_bench_multigpu_smoke_runs_on_cpu(tmp_path, tiny_model_dir):
    """bench/bench_multigpu.py --smoke: 1 process vs FSDP2 on gloo (same fixed-batch loss) and the 72B case's
    meta-device build + sharded materialization + adapter check on the tiny shape. Its lifecycle case
    (life_fsdp2: train -> save -> eval -> SIGKILL -> resume through the CLI) is left to the GPU runs: on CPU
    it took ~50 s of the suite, and test_fsdp2_save_matches_ddp_and_resumes covers the same CLI path here."""
    out = tmp_path / "mg.json"
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_multigpu.py"), "--smoke", "--out", str(out),
                          "--cases", "single,fsdp2,lora_72b", "--model_root", str(tmp_path), "--work", str(tmp_path / "w"),
                          "--port", free_port()],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["loss_check"]["fsdp2"]["pass"]  # DDP == one process is tested above
    big = r["cases"]["lora_72b"]  # --smoke: the tiny shape through the same meta-device + FSDP2 path
    assert big["adapter_check"]["ok"] and big["steps"] == 5 and all(math.isfinite(x) for x in big["losses"])
    assert "| fsdp2 | 2 |" in res.stdout


def test_meta_built_model_is_materialized_with_real_buffers(tmp_path):
    """A shape-only preset folder builds on the meta device; materialize() allocates it, restores the
    rotary buffers that to_empty() wipes, and initializes weights (N(0, std), norms 1, LoRA B 0)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ocrtune.models.loading import build_on_meta, is_random_init
    from ocrtune.models.presets import build_preset
    from ocrtune.train.distributed import materialize, real_buffers
    folder = build_preset("tiny", tmp_path / "tiny_meta", meta=True)
    assert is_random_init(folder) and not list(folder.glob("*.safetensors"))
    model = build_on_meta(folder)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, torch.device("cpu"), real_buffers(model), 0.1, seed=0)
    ref = dict(AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(folder)).named_buffers())
    for name, b in model.named_buffers():
        assert torch.equal(b, ref[name]), name
    w = model.model.language_model.layers[0].mlp.gate_proj.weight  # 256 x 128 draws: std within a few %
    assert not w.is_meta and abs(float(w.std()) - 0.1) < 0.005
    assert torch.equal(model.model.language_model.norm.weight, torch.ones_like(model.model.language_model.norm.weight))


def test_generation_in_eval_on_a_bf16_lora_model(tmp_path, tiny_model_dir):
    """bf16 base + float32 LoRA with PEFT's input upcast off (ResponseLoss): --predict_with_generate runs
    the LoRA branch under the training autocast (was: 'expected m1 and m2 to have the same dtype')."""
    _, log = sft(tmp_path, 2, None, ["--max_steps", "1", "--eval_steps", "1", "--dtype", "bfloat16",
                                     "--predict_with_generate", "true", "--max_new_tokens", "4"])
    assert "eval_bleu4" in [r for r in log if "eval_loss" in r][-1]


def test_device_map_decision():
    """One process seeing several GPUs splits the layers (auto by default); torchrun/FSDP/DeepSpeed place
    the model themselves, and one GPU (or CPU) needs no map."""
    from ocrtune.errors import UserError
    from ocrtune.train.distributed import device_map_choice
    assert device_map_choice(None, 2, False, False) == "auto"
    assert device_map_choice("balanced", 8, False, False) == "balanced"
    assert device_map_choice(None, 1, False, False) is None
    assert device_map_choice(None, 2, True, False) is None  # NPROC_PER_NODE / torchrun: one GPU per rank
    assert device_map_choice(None, 2, False, True) is None  # --fsdp / --deepspeed
    assert device_map_choice("none", 8, False, False) is None
    with pytest.raises(UserError, match="torchrun"):
        device_map_choice("auto", 2, True, False)


def test_a_taken_master_port_is_a_one_line_error(tmp_path, tiny_model_dir):
    """torchrun's rendezvous fails before any rank runs: one `error:` naming MASTER_PORT, exit 2."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = str(s.getsockname()[1])
        env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-m", "ocrtune", "sft", *FLAGS, "--output_dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: torchrun could not start its rendezvous") and "MASTER_PORT" in last, last
    assert "Traceback" not in res.stderr and "report it" not in res.stderr


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_a_rank_whose_micro_batch_fails_to_encode_stays_in_step(tmp_path, tiny_model_dir, engine):
    """--check_dataset_strategy none: a row whose image is missing reaches the loader and its one-row
    micro-batch collates to None on rank 1 (in training and in evaluation). That rank runs a filler
    pass (loss x 0, result dropped) instead of skipping its collectives (was: a hang)."""
    import pyarrow.parquet as pq

    from ocrtune.data.registry import OCR_PROMPT, SAMPLE_DIR
    from ocrtune.train.data import epoch_batches
    rows = pq.read_table(SAMPLE_DIR / "train.parquet").slice(0, 6).to_pylist()
    recs = []
    for i, r in enumerate(rows):
        (tmp_path / f"{i}.png").write_bytes(r["image"]["bytes"])
        recs.append({"query": "<image>" + OCR_PROMPT, "response": r["text"], "images": [str(tmp_path / f"{i}.png")]})
    bad = {**recs[0], "images": [str(tmp_path / "missing.png")]}
    train = recs[:4]
    train[epoch_batches(4, 1, 5, 0, rank=1, world=2)[0][0]] = bad  # rank 1's first micro-batch of epoch 0
    val = [recs[4], bad]  # even_batches: row 1 goes to rank 1
    for name, rs in (("train", train), ("val", val)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    cmd = [sys.executable, "-m", "ocrtune", "sft", "--model", "tiny", "--dataset", str(tmp_path / "train.jsonl"),
           "--val_dataset", str(tmp_path / "val.jsonl"), "--check_dataset_strategy", "none", "--batch_size", "1",
           "--max_steps", "2", "--eval_steps", "2", "--logging_steps", "1", "--lora_dropout", "0",
           "--report_to", "none", "--seed", "5", "--output_dir", str(tmp_path / "out")]
    cmd += ["--fsdp", "full_shard auto_wrap"] if engine == "fsdp2" else []
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as errf:  # a file, not a pipe: a hung rank cannot block the read
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, env=env)
        try:
            proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its ranks (they run in their own sessions) on SIGTERM
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            pytest.fail("the ranks fell out of step: the run hung")
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    run = next((tmp_path / "out" / "tiny").glob("v*-*"))
    log = [json.loads(l) for l in (run / "logging.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    evals = [r for r in log if "eval_loss" in r]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval_loss"]) and evals[0]["eval_loss"] > 0
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2


def test_max_time_on_one_rank_stops_both_ranks_after_the_same_step(tmp_path, tiny_model_dir):
    """NPROC_PER_NODE=2, --max_time given, and only rank 1 finds its time up (ranks' clocks differ): the stop rides in
    the step's all-reduce, so both ranks stop after step 1 and save it together (no save step due), and the command
    exits 0 with rank 0's message. Without the agreement rank 0 would go on alone and wait for rank 1 forever.
    Two loader workers per rank: the workers' light batches (one frame of each image) go through DDP."""
    import faults
    out = tmp_path / "run"
    cmd = faults.command("sft", *FLAGS, "--batch_size", "2", "--output_dir", str(out), "--max_steps", "400",
                         "--save_steps", "1000", "--eval_steps", "1000", "--max_time", "3600",
                         "--dataloader_num_workers", "2", time_up_on_rank=1)
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = next(out.glob("tiny/v*-*"))
    assert f"stopped at --max_time 3600s at step 1; saved {run / 'checkpoint-1'}" in res.stderr
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-1"]
    assert json.loads((run / "checkpoint-1" / "trainer_state.json").read_text())["global_step"] == 1


def test_sigterm_to_torchrun_stops_every_rank_after_the_same_step_and_saves_it(tmp_path, tiny_model_dir):
    """NPROC_PER_NODE=2: SIGTERM to the launcher (what `timeout` or a scheduler sends) reaches both ranks through
    torchrun; they agree on the step to stop after, save it together (one checkpoint, no regular save due) and the
    command exits 143 with rank 0's one-line message."""
    import re
    import signal
    import time
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ocrtune", "sft", *FLAGS, "--batch_size", "2", "--output_dir", str(out),
           "--max_steps", "400", "--save_steps", "1000", "--eval_steps", "1000"]
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": free_port(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.time()
    while not any(l.strip() for f in out.glob("tiny/v*-*/logging.jsonl") for l in f.read_text().splitlines()[1:]):
        assert proc.poll() is None and time.time() - t0 < 300, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # the launcher only, as `timeout` does
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    step = int(re.search(r"stopped by SIGTERM at step (\d+); saved", err).group(1))
    run = next(out.glob("tiny/v*-*"))
    assert [p.name for p in run.glob("checkpoint-*")] == [f"checkpoint-{step}"] and 2 <= step < 400
    state = json.loads((run / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert load_file(run / f"checkpoint-{step}" / "adapter_model.safetensors")


def test_rlhf_relaunches_as_rlhf_under_two_processes(tmp_path):
    """NPROC_PER_NODE=2 ocrtune rlhf: torchrun's ranks run rlhf (not sft), step together and write one run."""
    cmd = [sys.executable, "-m", "ocrtune", "rlhf", "--rlhf_type", "grpo", "--model", "tiny", "--dataset", "latex-ocr-sample#16",
           "--num_generations", "4", "--batch_size", "4", "--max_completion_length", "6", "--max_steps", "2",
           "--logging_steps", "1", "--save_steps", "2", "--report_to", "none", "--output_dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **two_ranks()})
    assert res.returncode == 0, res.stderr[-3000:]
    runs = list((tmp_path / "tiny").glob("v*-*"))
    assert len(runs) == 1, runs
    log = [json.loads(line) for line in (runs[0] / "logging.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all("reward/edit_distance/mean" in r for r in log)
    assert (runs[0] / "checkpoint-2" / "adapter_model.safetensors").is_file()
