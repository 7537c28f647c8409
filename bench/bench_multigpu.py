"""Multi-GPU benchmark: one script, one device call.

Throughput cases (7B preset LoRA on LaTeX_OCR print rows, packing, the `ocrtune sft` code path via
bench_sft.make_ocrtune_run), each in its own torchrun process group:
  single  1 GPU;  ddp  2 GPUs DDP;  fsdp2  2 GPUs FSDP2;  zero3  2 GPUs DeepSpeed ZeRO-3 (if importable)
Each reports global samples/s and tokens/s, per-GPU peak memory, and the loss of one fixed packed
batch (same rows, same weights: LoRA B starts at zero), which must agree across engines within
2^-7 relative in bf16 (the bf16 GEMM output is rounded once, unit roundoff 2^-8, and the check
loss is a mean over thousands of tokens; 2^-7 allows the hidden state's rounding too); fp32 smoke
runs use 1e-4. Scaling efficiency = samples/s on 2 GPUs / (2 x samples/s on 1 GPU).

Lifecycle cases (life_fsdp2, life_zero3): the real CLI, `NPROC_PER_NODE=2 ocrtune sft --fsdp ...`:
trains, saves every --life_save steps, evaluates with --predict_with_generate, is SIGKILLed (every
rank: the whole process group) once the first checkpoint exists, then resumes with
`--resume_from_checkpoint last` to the end; the final adapter folder is checked with plain PEFT.

lora_72b: the Qwen2-VL-72B shape (random weights, built on the meta device and materialized
sharded by FSDP2, never a full copy in host memory), >= 20 LoRA steps on 2 GPUs, adapter saved and
checked against a meta-device PEFT model (keys and shapes).

Partial results go to --out after every case; a markdown table is printed last.

    python bench/bench_multigpu.py --data .carry/print.parquet --out $OUT/multigpu.json --budget_s 470
    python bench/bench_multigpu.py --smoke --out /tmp/mg.json     # CPU, tiny preset, gloo
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

BF16_REL_TOL = 2 ** -7
FP32_REL_TOL = 1e-4
SAMPLE = ROOT / "ocrtune" / "data" / "sample"


# ---------------------------------------------------------------- worker (inside torchrun)

def timed_steps(run, n: int, count_steps: bool = False) -> list[dict]:
    """`n` optimizer steps of one micro-batch each, each timed between device syncs (peak memory reset first);
    count_steps advances the run's global_step as its loop would (the 72B case saves through run.save)."""
    import bench_sft as bs
    bs._reset_mem()
    stream, steps = run.micro_batches(), []
    for _ in range(n):
        bs._sync()
        t = time.perf_counter()
        batch = next(stream)[-1]  # (epoch, done, size, batch)
        stats = run.train_step([batch])
        bs._sync()
        steps.append({**bs._batch_stats(batch), "time": time.perf_counter() - t,
                      "loss": stats.loss_sum / max(stats.tokens, 1)})
        if count_steps:
            run.state["global_step"] += 1
    return steps


def worker_throughput(a):
    import torch
    import torch.distributed as tdist

    import bench_sft as bs
    from ocrtune.data.packing import pack

    overrides = {"fsdp": "full_shard auto_wrap"} if a.engine == "fsdp2" else {}
    if a.engine.startswith("zero"):
        overrides = {"deepspeed": a.engine}
    overrides.update(json.loads(a.overrides or "{}"))
    t0 = time.perf_counter()
    run = bs.make_ocrtune_run(a, a.steps + a.warmup + 1, a.packing_tokens, overrides)
    setup = time.perf_counter() - t0
    acc, ds = run.accelerator, run.train_ds
    fixed = [ds[i] for i in range(bs.CHECK_ROWS)]  # every rank the same rows: one collective forward
    run.loss_module.eval()
    with torch.no_grad(), acc.autocast():
        b = {k: v.to(acc.device) for k, v in pack(fixed, 0).items()}
        l, n, _ = run.loss_module(**b)
    check = float(l) / int(n)
    steps = timed_steps(run, a.steps + a.warmup)
    timed = steps[a.warmup:]
    wall = sum(s["time"] for s in timed)
    mine = {"samples": sum(s["samples"] for s in timed), "tokens": sum(s["tokens"] for s in timed), **bs._mem()}
    ranks = [mine]
    if acc.num_processes > 1:
        ranks = [None] * acc.num_processes
        tdist.all_gather_object(ranks, mine)
    if acc.is_main_process:
        r = {"case": a.case, "engine": a.engine, "gpus": acc.num_processes, "steps_timed": len(timed),
             "seconds": round(wall, 3), "samples_per_s": round(sum(x["samples"] for x in ranks) / wall, 2),
             "tokens_per_s": round(sum(x["tokens"] for x in ranks) / wall, 1),
             "per_gpu_max_reserved_gib": [x["max_reserved_gib"] for x in ranks],
             "per_gpu_max_allocated_gib": [x["max_allocated_gib"] for x in ranks],
             "check_loss": check, "first_losses": [round(s["loss"], 5) for s in steps[:3]],
             "setup_s": round(setup, 1), "packing_tokens": run.args.packing_tokens, "liger": bool(run.args.use_liger),
             "fused_lora": bool(run.args.fused_lora), "overrides": overrides}
        print("RESULT " + json.dumps(r), flush=True)


def worker_72b(a):
    """LoRA on the meta-built 72B shape under FSDP2; saves the adapter through the trainer's save()."""
    import torch
    import torch.distributed as tdist

    import bench_sft as bs
    overrides = {"fsdp": "full_shard auto_wrap", "save_steps": a.steps + a.warmup,
                 "output_dir": a.work}
    overrides.update(json.loads(a.overrides or "{}"))
    t0 = time.perf_counter()
    run = bs.make_ocrtune_run(a, a.steps + a.warmup, a.packing_tokens, overrides)
    setup = time.perf_counter() - t0
    acc = run.accelerator
    steps = timed_steps(run, a.steps + a.warmup, count_steps=True)
    t = time.perf_counter()
    run.save(None)
    save_s = time.perf_counter() - t
    timed = steps[a.warmup:]
    wall = sum(s["time"] for s in timed)
    mine = {"samples": sum(s["samples"] for s in timed), "tokens": sum(s["tokens"] for s in timed), **bs._mem()}
    ranks = [None] * acc.num_processes
    tdist.all_gather_object(ranks, mine) if acc.num_processes > 1 else ranks.__setitem__(0, mine)
    if acc.is_main_process:
        ckpt = run.run_dir / f"checkpoint-{run.state['global_step']}"
        r = {"case": a.case, "engine": "fsdp2", "gpus": acc.num_processes, "steps": len(steps),
             "steps_timed": len(timed), "seconds": round(wall, 3),
             "samples_per_s": round(sum(x["samples"] for x in ranks) / wall, 3),
             "tokens_per_s": round(sum(x["tokens"] for x in ranks) / wall, 1),
             "per_gpu_max_reserved_gib": [x["max_reserved_gib"] for x in ranks],
             "losses": [round(s["loss"], 4) for s in steps], "setup_s": round(setup, 1), "save_s": round(save_s, 1),
             "checkpoint": str(ckpt), "adapter_check": check_adapter(ckpt, meta_model=True)}
        print("RESULT " + json.dumps(r), flush=True)
    del torch


def check_adapter(ckpt: Path, meta_model: bool = False) -> dict:
    """The folder is a plain PEFT adapter: PEFT reads its config, and its tensors match the keys and
    shapes of the LoRA weights PEFT creates for that config (on a meta-device model when asked)."""
    from peft import PeftConfig, get_peft_model, get_peft_model_state_dict
    from safetensors import safe_open
    cfg = PeftConfig.from_pretrained(str(ckpt))
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if not meta_model:
        return {"ok": bool(saved) and all("lora_" in k for k in saved), "tensors": len(saved), "r": cfg.r}
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    conf = AutoConfig.from_pretrained(cfg.base_model_name_or_path)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForImageTextToText.from_config(conf), cfg)
    want = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    return {"ok": want == saved, "tensors": len(saved), "expected": len(want), "r": cfg.r,
            "mismatch": sorted(set(want.items()) ^ set(saved.items()))[:5]}


# ---------------------------------------------------------------- orchestration

def _env(a, extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if a.smoke else "8"),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    return {**env, **(extra or {})}


def _torchrun(nproc: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={port}"]


def worker_cmd(a, case: str, engine: str, nproc: int, worker: str, extra: list[str] | None = None) -> list[str]:
    cmd = _torchrun(nproc, a.port) + [__file__, "--worker", worker, "--case", case, "--engine", engine,
                                      "--model_dir", a.model_dir, "--data", a.data, "--rows", str(a.rows),
                                      "--steps", str(a.steps), "--warmup", str(a.warmup),
                                      "--packing_tokens", str(a.packing_tokens), "--max_pixels", str(a.max_pixels),
                                      "--workers", str(a.workers), "--lora_dropout", str(a.lora_dropout)]
    return cmd + (["--liger"] if a.liger else []) + (["--overrides", a.overrides] if a.overrides else []) + (extra or [])


def run_case(a, case: str, cmd: list[str], timeout: float) -> dict:
    import bench_sft as bs
    if timeout < 30:
        print(f"  skipped {case}: {timeout:.0f}s of the time budget left", flush=True)
        return {"case": case, "error": f"skipped: {timeout:.0f}s of the time budget left"}
    print("$", " ".join(shlex.quote(x) for x in cmd), flush=True)
    t = time.time()
    rc, text = bs._run_proc(cmd, timeout, env=_env(a))
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    if rc is None or rc != 0 or not lines:
        tail = bs._tail(text, 60)  # torchrun's summary alone is ~20 lines: keep the failing rank's own error too
        print(f"  {'timed out' if rc is None else f'rc={rc}'}\n" + "\n".join(tail), flush=True)
        return {"case": case, "error": f"timeout {timeout:.0f}s" if rc is None else (tail[-1] if tail else f"rc {rc}")[:300],
                "log_tail": tail}
    r = json.loads(lines[-1][7:])
    r["process_wall_s"] = round(time.time() - t, 1)
    print("  " + json.dumps(r), flush=True)
    return r


def _run_dir(out: Path) -> Path | None:
    runs = sorted(out.glob("**/args.json"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else None


def _log(run_dir: Path) -> list[dict]:
    p = run_dir / "logging.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def run_lifecycle(a, case: str, engine_flags: list[str], timeout: float) -> dict:
    """Train -> save -> eval with generation -> SIGKILL every rank -> resume 'last' -> finish."""
    import bench_sft as bs
    t0 = time.time()
    out = Path(a.work) / case
    subprocess.run(["rm", "-rf", str(out)], check=False)
    steps, every = a.life_steps, a.life_save
    cmd = [sys.executable, "-m", "ocrtune", "sft", "--model", a.model_dir, "--dataset", f"{a.data}#{a.life_rows}",
           "--val_dataset", f"{a.val_data}#{a.life_val}", "--max_steps", str(steps), "--save_steps", str(every),
           "--eval_steps", str(every), "--predict_with_generate", "true", "--max_new_tokens", str(a.life_new_tokens),
           "--packing", "true", "--packing_tokens", str(a.life_packing_tokens), "--batch_size", "4",
           "--logging_steps", "1", "--report_to", "none", "--output_dir", str(out), "--max_pixels", str(a.max_pixels),
           "--learning_rate", "1e-4", *engine_flags]
    env = _env(a, {"NPROC_PER_NODE": "2", "MASTER_PORT": str(a.port + 1)})
    print("$ NPROC_PER_NODE=2", " ".join(shlex.quote(x) for x in cmd), flush=True)
    r = {"case": case, "command": "NPROC_PER_NODE=2 " + " ".join(shlex.quote(x) for x in cmd[2:])}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    first = None
    try:  # wait for the first complete checkpoint, then kill every rank at once
        while p.poll() is None and time.time() - t0 < timeout * 0.6:
            rd = _run_dir(out)
            if rd is not None and (rd / f"checkpoint-{every}" / "trainer_state.json").exists():
                first = rd / f"checkpoint-{every}"
                break
            time.sleep(0.5)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        text = p.communicate()[0]
    if first is None:
        return {**r, "error": "no checkpoint before the kill", "log_tail": bs._tail(text, 20)}
    r["killed_after_s"] = round(time.time() - t0, 1)
    r["before_kill_log"] = _log(first.parent)[-3:]
    rc, text = bs._run_proc(cmd + ["--resume_from_checkpoint", "last"], max(30, timeout - (time.time() - t0)), env=env)
    rd = _run_dir(out)
    log = _log(rd) if rd else []
    evals = [x for x in log if "eval_loss" in x]
    trains = [x for x in log if "loss" in x]
    ckpts = sorted((rd.glob("checkpoint-*")) if rd else [], key=lambda q: int(q.name.split("-")[1]))
    last = ckpts[-1] if ckpts else None
    r.update({"resume_rc": rc, "final_step": int(last.name.split("-")[1]) if last else None,
              "checkpoints": [q.name for q in ckpts], "evals": evals[-2:],
              "generation_metrics": bool(evals and "eval_bleu4" in evals[-1]),
              "train_steps_logged": [x["step"] for x in trains], "seconds": round(time.time() - t0, 1)})
    if rc != 0 or last is None:
        return {**r, "error": f"resume rc {rc}", "log_tail": bs._tail(text, 20)}
    r["adapter_check"] = check_adapter(last) if (last / "adapter_model.safetensors").exists() else {"ok": False}
    r["ok"] = bool(r["final_step"] == steps and r["generation_metrics"] and r["adapter_check"]["ok"]
                   and min(x["step"] for x in trains if x["step"] > every) == every + 1)
    print("  " + json.dumps({k: v for k, v in r.items() if k not in ("before_kill_log",)}), flush=True)
    return r


def loss_checks(cases: dict, tol: float) -> dict:
    base = cases.get("single", {}).get("check_loss")
    out = {"tolerance_rel": tol}
    for name, r in cases.items():
        if name != "single" and base is not None and "check_loss" in r:
            rel = abs(r["check_loss"] - base) / abs(base)
            out[name] = {"check_loss": r["check_loss"], "rel_diff": rel, "pass": rel <= tol}
    out["single"] = base
    return out


def has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
        return True
    except Exception:
        return False


def orchestrate(a):
    import torch
    from ocrtune.models.presets import build_preset
    t0 = time.time()

    def left(cap):
        return min(cap, a.budget_s - (time.time() - t0) - 5) if a.budget_s else cap

    res = {"command": " ".join(shlex.quote(x) for x in sys.argv), "data": a.data, "preset": a.preset,
           "smoke": a.smoke, "cases": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        res["wall_s"] = round(time.time() - t0, 1)
        out.write_text(json.dumps(res, indent=1))

    ngpu = torch.cuda.device_count()
    res["gpus"] = [torch.cuda.get_device_name(i) for i in range(ngpu)] or ["cpu"]
    res["deepspeed"] = has_deepspeed()
    model_dir = Path(a.model_root) / f"mg_{a.preset}"
    if not (model_dir / "config.json").exists():
        t = time.time()
        build_preset(a.preset, model_dir)
        res["build_s"] = round(time.time() - t, 1)
    a.model_dir = str(model_dir)
    save()
    engines = [("single", 1), ("ddp", 2), ("fsdp2", 2)] + ([("zero3", 2)] if res["deepspeed"] else [])
    wanted = a.cases.split(",")
    for name, nproc in engines:
        if name in wanted:
            a.port += 2  # a fresh rendezvous port per case (the last one may linger in TIME_WAIT)
            res["cases"][name] = run_case(a, name, worker_cmd(a, name, name, nproc, "throughput"), left(a.timeout))
            save()
    s1, s2 = res["cases"].get("single", {}).get("samples_per_s"), res["cases"].get("ddp", {}).get("samples_per_s")
    res["scaling"] = {n: round(r["samples_per_s"] / (2 * s1), 4) for n, r in res["cases"].items()
                      if n != "single" and s1 and "samples_per_s" in r}
    res["loss_check"] = loss_checks(res["cases"], FP32_REL_TOL if a.smoke else BF16_REL_TOL)
    res["ddp_done_when"] = {"speedup": round(s2 / s1, 3) if s1 and s2 else None,
                            "pass": bool(s1 and s2 and s2 / s1 >= 1.85 and res["loss_check"].get("ddp", {}).get("pass"))}
    save()
    for name, flags in (("life_fsdp2", ["--fsdp", "full_shard auto_wrap"]), ("life_zero3", ["--deepspeed", "zero3"])):
        if name in wanted and (name != "life_zero3" or res["deepspeed"]):
            res["cases"][name] = run_lifecycle(a, name, flags, left(a.life_timeout))
            save()
    if "lora_72b" in wanted:
        big = "tiny" if a.smoke else "72b"
        mdir = Path(a.model_root) / f"mg_{big}_meta"
        if not (mdir / "config.json").exists():
            build_preset(big, mdir, meta=True)  # config + processor only: the weights are built sharded
        a.port += 2
        b = argparse.Namespace(**{**vars(a), "model_dir": str(mdir), "steps": a.big_steps, "warmup": 2,
                                  "packing_tokens": a.big_packing_tokens})
        res["cases"]["lora_72b"] = run_case(a, "lora_72b", worker_cmd(b, "lora_72b", "fsdp2", 2, "72b",
                                                                       ["--work", str(Path(a.work) / "lora_72b")]),
                                            left(a.big_timeout))
        save()
    print_table(res)
    return res


def print_table(res):
    rows = ["| case | GPUs | samples/s | tokens/s | scaling | per-GPU peak reserved GiB | check loss | status |",
            "|---|---|---|---|---|---|---|---|"]
    lc = res.get("loss_check", {})
    for name, r in res["cases"].items():
        if "samples_per_s" in r:
            ok = lc.get(name, {}).get("pass", "-") if name != "single" else "ref"
            rows.append(f"| {name} | {r['gpus']} | {r['samples_per_s']} | {r['tokens_per_s']} | "
                        f"{res.get('scaling', {}).get(name, '-')} | {r.get('per_gpu_max_reserved_gib')} | "
                        f"{r.get('check_loss', '-')!s:.8} ({ok}) | ok |")
        elif name.startswith("life"):
            rows.append(f"| {name} | 2 | - | - | - | - | - | {'ok' if r.get('ok') else r.get('error', 'FAILED')} "
                        f"(final step {r.get('final_step')}, generation {r.get('generation_metrics')}) |")
        else:
            rows.append(f"| {name} | - | - | - | - | - | - | {r.get('error', '?')} |")
    print("\n".join(rows), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="LaTeX_OCR print parquet (train rows); --smoke: the bundled sample")
    p.add_argument("--val_data", help="parquet for the lifecycle eval rows (default: --data)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny preset, gloo, a few steps: tests the script")
    p.add_argument("--preset", default="7b")
    p.add_argument("--cases", default="single,ddp,fsdp2,zero3,life_fsdp2,life_zero3,lora_72b")
    p.add_argument("--model_root", default="/tmp")
    p.add_argument("--work", default="/tmp/bench_multigpu")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--packing_tokens", type=int, default=16384)
    p.add_argument("--max_pixels", type=int, default=1280 * 28 * 28)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--liger", action="store_true")
    p.add_argument("--overrides", help="JSON of SftArgs overrides for every throughput case, e.g. '{\"fused_lora\": true}'")
    p.add_argument("--timeout", type=float, default=110, help="seconds for each throughput case")
    p.add_argument("--life_steps", type=int, default=6)
    p.add_argument("--life_save", type=int, default=3)
    p.add_argument("--life_rows", type=int, default=400)
    p.add_argument("--life_val", type=int, default=8)
    p.add_argument("--life_new_tokens", type=int, default=32)
    p.add_argument("--life_packing_tokens", type=int, default=8192)
    p.add_argument("--life_timeout", type=float, default=150)
    p.add_argument("--big_steps", type=int, default=20)
    p.add_argument("--big_packing_tokens", type=int, default=4096)
    p.add_argument("--big_timeout", type=float, default=200)
    p.add_argument("--budget_s", type=float, default=0, help="wall-clock budget of the whole run (0: none)")
    p.add_argument("--port", type=int, default=29611)
    p.add_argument("--out", default="bench/results/multigpu.json")
    # worker side
    p.add_argument("--worker", choices=("throughput", "72b"), help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument("--model_dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.batch, a.no_gc = 32, False
    if a.smoke:
        a.data = a.data or str(SAMPLE / "train.parquet")
        a.preset = "tiny"
        if a.worker is None:
            a.rows, a.steps, a.warmup, a.packing_tokens, a.max_pixels = min(a.rows, 64), min(a.steps, 3), 1, 2048, 64 * 28 * 28
            a.life_rows, a.life_val, a.life_new_tokens, a.life_packing_tokens = 48, 4, 4, 2048
            a.big_steps, a.big_packing_tokens, a.workers = 3, 2048, 0
    if not a.data:
        p.error("--data is required (a LaTeX_OCR parquet), or use --smoke")
    a.val_data = a.val_data or (str(SAMPLE / "validation.parquet") if a.smoke else a.data)
    if a.worker:
        from ocrtune.train.distributed import end_process_group
        try:
            return (worker_throughput if a.worker == "throughput" else worker_72b)(a)
        finally:
            end_process_group()
    res = orchestrate(a)
    failed = [n for n, r in res["cases"].items() if "error" in r or r.get("ok") is False]
    if failed:
        print(f"error: case(s) {', '.join(failed)} failed (details in {a.out})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
