"""Host-bound decoding beside another busy Python thread: every torch op releases the GIL and takes it back,
and a thread busy in Python keeps it for up to the interpreter's switch interval (5 ms by default) each time.
Decodes a batch of the bundled reader greedily (the engine's dynamic loop, float32, one torch thread) alone, beside
a thread spinning in Python, and beside it with a 0.2 ms switch interval. What serve or eval runs beside its model
thread (request parsing, prompt encoding) costs the decoding far more than its own time where the model's ops are
short: a reason to keep such work out of the decoding process's busy periods, and for CUDA graphs (one replay a
step instead of ~1,800 ops, tests/test_static_decode.py).

    python bench/learning/gil_convoy.py --out bench/learning/gil_convoy_dev2cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import torch

    import bench_infer
    from ocrtune.models.generate import InferEngine
    torch.set_num_threads(1)
    ns = argparse.Namespace(model="ocrtune-reader", dtype="fp32", attn="sdpa", device="cpu", max_pixels=None,
                            model_root=os.environ.get("TMPDIR", "/tmp"), seed=0)
    model, processor, template, _ = bench_infer.load(ns)
    engine = InferEngine(model, processor, template, decode="dynamic", workers=0)
    encoded = engine._encode_all(bench_infer.read_rows(os.path.join(ROOT, "ocrtune/data/sample/train.parquet"), a.rows))

    def decode() -> float:
        t = time.perf_counter()
        engine.generate_answers(encoded, a.max_new_tokens)
        return round(time.perf_counter() - t, 3)

    decode()
    res = {"command": "python " + " ".join(sys.argv), "rows": a.rows, "max_new_tokens": a.max_new_tokens,
           "alone_s": min(decode(), decode())}
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(2000))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        res["beside_busy_thread_s"] = decode()
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0002)
        res["beside_busy_thread_switch_0.2ms_s"] = decode()
        sys.setswitchinterval(interval)
    finally:
        stop.set()
        thread.join()
    res["slowdown"] = round(res["beside_busy_thread_s"] / res["alone_s"], 1)
    res["slowdown_switch_0.2ms"] = round(res["beside_busy_thread_switch_0.2ms_s"] / res["alone_s"], 1)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(res)


if __name__ == "__main__":
    main()
