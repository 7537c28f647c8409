#!/usr/bin/env python3
"""The data pipeline at a million rows: host memory peak, time to the first step and steady samples/s
of `ocrtune sft` on a folder of parquet shards of N rows, against the same run on the original rows.

The N-row folder repeats the rows of --data (LaTeX_OCR schema) in shards of --shard_rows: throughput
and memory depend on row count and row size, not on the formulas being distinct. Each size runs
`ocrtune sft --model <preset> --dataset <folder> --packing true ... --max_steps S` in its own process;
a sampler thread adds up the RSS of that process tree every 0.2 s (main process, DDP ranks and
dataloader workers). Time to first step is from the launch to the first logging.jsonl record
(--logging_steps 1); samples/s is taken between step S/3 and step S from that log's train_speed.

  python bench/bench_pipeline.py --data .carry/latex/print/train.parquet --rows 14000,1000000 --out $OUT/pipeline.json
  python bench/bench_pipeline.py --smoke   # CPU: tiny model, 300 and 3,000 rows of the bundled sample
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="LaTeX_OCR-schema parquet file whose rows are repeated")
    p.add_argument("--rows", default="14000,1000000", help="comma-separated dataset sizes")
    p.add_argument("--shard_rows", type=int, default=50_000)
    p.add_argument("--work", default="/tmp/ocrtune_pipeline")
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--packing_tokens", type=int, default=16384)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--gpus", type=int, default=1, help="NPROC_PER_NODE for the runs (1: one process)")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds per run")
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        from ocrtune.data.registry import SAMPLE_DIR
        a.data, a.rows, a.shard_rows, a.model, a.steps = str(SAMPLE_DIR / "train.parquet"), "300,3000", 1000, "tiny", 4
        a.packing_tokens, a.workers = 2048, 0
    return a


def make_folder(src: str, n: int, shard_rows: int, out: Path) -> Path:
    """`n` rows of `src` repeated, as parquet shards in `out` (made once; reused when complete)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    done = out / "ROWS"
    if done.exists() and done.read_text() == str(n):
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("*.parquet"):
        f.unlink()
    table = pq.read_table(src, columns=["image", "text"])
    for i, start in enumerate(range(0, n, shard_rows)):
        take = min(shard_rows, n - start)
        idx = pa.array([(start + j) % len(table) for j in range(take)])
        pq.write_table(table.take(idx), out / f"train-{i:05d}.parquet")
    done.write_text(str(n))
    return out


def tree_rss(pid: int) -> int:
    import psutil
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_one(a, folder: Path, n: int) -> dict:
    run_dir = Path(a.work) / f"run_{n}"
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "ocrtune", "sft", "--model", a.model, "--dataset", str(folder),
           "--dataset_test_ratio", "0", "--packing", "true", "--packing_tokens", str(a.packing_tokens),
           "--max_steps", str(a.steps), "--logging_steps", "1", "--eval_steps", str(10 ** 6), "--save_steps", str(10 ** 6),
           "--dataloader_num_workers", str(a.workers), "--report_to", "none", "--output_dir", str(run_dir),
           "--add_output_dir_suffix", "false", "--check_dataset_strategy", "warning"]
    env = dict(os.environ, HF_DATASETS_CACHE=str(Path(a.work) / f"hf_cache_{n}"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))
    if a.gpus > 1:
        env["NPROC_PER_NODE"] = str(a.gpus)
    t0 = time.time()
    log = open(Path(a.work) / f"run_{n}.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak, first_step = 0, None
    stop = threading.Event()

    def sample():
        nonlocal peak, first_step
        while not stop.is_set():
            peak = max(peak, tree_rss(proc.pid))
            if first_step is None and (run_dir / "logging.jsonl").exists() and (run_dir / "logging.jsonl").stat().st_size:
                first_step = time.time() - t0
            stop.wait(0.2)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        rc = proc.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = "timeout"
    stop.set()
    th.join()
    log.close()
    recs = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()] if (run_dir / "logging.jsonl").exists() else []
    pts = [(r["step"], r["step"] / r["train_speed(iter/s)"]) for r in recs if r.get("train_speed(iter/s)")]
    out = {"rows": n, "exit": rc, "wall_s": round(time.time() - t0, 1), "host_rss_peak_gib": round(peak / 2 ** 30, 2),
           "time_to_first_step_s": round(first_step, 1) if first_step else None, "command": shlex.join(cmd)}
    if len(pts) >= 3:
        (s0, t_0), (s1, t_1) = pts[len(pts) // 3], pts[-1]
        sec = (t_1 - t_0) / (s1 - s0)
        out["seconds_per_step"] = round(sec, 4)
        out["samples_per_second"] = round(a.samples_per_step / sec, 1)
    if rc != 0:
        out["log_tail"] = (Path(a.work) / f"run_{n}.log").read_text(errors="replace")[-1500:]
    return out


def samples_per_step(a, src: str) -> float:
    """Mean samples in one step: the token budget of each rank over the mean sample length (the greedy
    packer fills a row to within one sample of the budget; same rows in every size, so the same mean)."""
    import pyarrow.parquet as pq

    from ocrtune.data.registry import latex_ocr_preprocess
    from ocrtune.models.loading import load_processor
    from ocrtune.models.presets import ensure_preset
    from ocrtune.models.template import Template
    from ocrtune.train.data import row_lengths
    rows = [latex_ocr_preprocess(r) for r in pq.read_table(src, columns=["image", "text"]).slice(0, 2000).to_pylist()]
    lengths = [n for n in row_lengths(rows, Template(load_processor(ensure_preset(a.model)), "qwen2_vl")) if n]
    mean = sum(lengths) / len(lengths)
    return max(1, a.gpus) * (a.packing_tokens - mean / 2) / mean


def main(argv=None) -> int:
    a = parse_args(argv)
    Path(a.work).mkdir(parents=True, exist_ok=True)
    results = {"command": shlex.join([sys.executable, *sys.argv]), "model": a.model, "steps": a.steps,
               "packing_tokens": a.packing_tokens, "workers": a.workers, "gpus": a.gpus, "runs": []}
    try:
        import torch
        results["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    except ImportError:
        pass
    a.samples_per_step = results["samples_per_step"] = round(samples_per_step(a, a.data), 1)
    for n in [int(x) for x in a.rows.split(",")]:
        t = time.time()
        folder = make_folder(a.data, n, a.shard_rows, Path(a.work) / f"rows_{n}")
        r = {"make_folder_s": round(time.time() - t, 1), **run_one(a, folder, n)}
        results["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "log_tail"}), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    base = results["runs"][0]
    for r in results["runs"][1:]:
        if r.get("seconds_per_step") and base.get("seconds_per_step"):
            r["steady_speed_vs_first"] = round(base["seconds_per_step"] / r["seconds_per_step"], 3)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| rows | host RSS peak GiB | time to first step s | samples/s | speed vs first |\n|---|---|---|---|---|")
    for r in results["runs"]:
        print(f"| {r['rows']:,} | {r['host_rss_peak_gib']} | {r['time_to_first_step_s']} | {r.get('samples_per_second')} | "
              f"{r.get('steady_speed_vs_first', 1.0 if r is base else '-')} |")
    return 0 if all(r["exit"] == 0 for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
