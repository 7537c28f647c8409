"""What a training step keeps for backward, module by module: one forward of a packed micro-batch through ocrtune's
training loss with every tensor autograd saves recorded (storage counted once), attributed to the innermost module
running when it was saved, and summed over the decoder layers. Tells where the memory plan's per-token activation
bytes go (ocrtune/train/memory_plan.py: KEEP_HIDDEN, KEEP_INTERMEDIATE), so the next exact saving is picked from a
measurement. No recompute here (`--recompute_layers 0`), the lean MLP on, so every layer keeps what it keeps.

    python3 bench/learning/saved_tensors.py --data print.parquet --model 7b --liger --tokens 4096 --out saved.json
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--model", default="7b")
    p.add_argument("--model_root", default="/tmp")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--liger", action="store_true")
    p.add_argument("--lora_dropout", type=float, default=0.05)
    p.add_argument("--lean_mlp", default="true")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    import torch
    import bench_sft
    from ocrtune.data.packing import pack

    model_dir = os.path.join(a.model_root, f"q{a.model}")  # bench_sft's folder for the same preset
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        from ocrtune.models.presets import build_preset
        build_preset(a.model, model_dir)
    ns = argparse.Namespace(model_dir=model_dir, data=a.data, rows=600, batch=32, liger=a.liger, no_gc=False,
                            lora_dropout=a.lora_dropout, max_pixels=1280 * 28 * 28, workers=0)
    run = bench_sft.make_ocrtune_run(ns, 2, a.tokens, {"recompute_layers": 0, "lean_mlp": a.lean_mlp == "true"})
    ds = run.train_ds
    rows, used = [], 0
    for i in range(len(ds)):
        s = ds[i]
        if s is None:
            continue
        n = len(s["input_ids"])
        if used + n > a.tokens:
            break
        rows.append(s)
        used += n
    dev = run.accelerator.device
    batch = {k: v.to(dev) for k, v in pack(rows, 0).items()}
    stack, per_module = [], collections.defaultdict(lambda: [0, collections.Counter()])
    # weights autograd saves (frozen base layers' for their input gradient) are held anyway: not activations
    seen = {(t.untyped_storage().data_ptr(), t.device) for t in (*run.model.parameters(), *run.model.buffers())}

    def pre(name):
        return lambda *_: stack.append(name)

    def post(*_):
        stack.pop()

    for name, m in run.model.named_modules():
        m.register_forward_pre_hook(pre(name))
        m.register_forward_hook(post)

    def pack_hook(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen and t.device.type == dev.type:
            seen.add(key)
            where = stack[-1] if stack else "(outside modules)"
            nbytes = t.untyped_storage().nbytes()
            per_module[where][0] += nbytes
            per_module[where][1][f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"] += 1
        return t

    run.loss_module.train()
    torch.cuda.reset_peak_memory_stats(dev) if dev.type == "cuda" else None
    before = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t), run.accelerator.autocast():
        loss, n, _ = run.loss_module(**batch)
    after = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
    cfg = run.model.config.get_text_config() if hasattr(run.model.config, "get_text_config") else run.model.config
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    tokens = int(batch["input_ids"].numel())
    by_part = collections.defaultdict(int)
    shapes = collections.defaultdict(collections.Counter)
    for where, (nbytes, counter) in per_module.items():
        part = re.sub(r"\.layers\.\d+\.", ".layers.N.", where)
        by_part[part] += nbytes
        shapes[part].update(counter)
    unit = tokens * hidden * 2  # one bf16 [tokens, hidden] tensor
    table = sorted(({"module": k, "bytes": v, "hidden_units": round(v / unit, 2),
                     "per_layer_hidden_units": round(v / unit / layers, 2) if ".layers.N." in k else None,
                     "tensors": dict(shapes[k].most_common(6))} for k, v in by_part.items()),
                   key=lambda r: -r["bytes"])
    total = sum(by_part.values())
    layer_total = sum(v for k, v in by_part.items() if ".layers.N." in k and "visual" not in k)
    report = {"command": "python3 " + " ".join(sys.argv), "model": a.model, "tokens": tokens, "hidden": hidden,
              "layers": layers, "intermediate": cfg.intermediate_size, "lora_dropout": a.lora_dropout,
              "lean_mlp": a.lean_mlp, "liger": bool(run.args.use_liger), "device": str(torch.cuda.get_device_name(dev))
              if dev.type == "cuda" else "cpu", "saved_bytes": total, "allocated_growth_bytes": after - before,
              "decoder_layers_hidden_units_per_layer": round(layer_total / unit / layers, 2), "modules": table}
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{a.model}, {tokens} tokens: saved {total / 2**30:.2f} GiB ({after - before:,} bytes allocated by the forward); "
          f"decoder layers {report['decoder_layers_hidden_units_per_layer']} hidden-sized tensors a layer")
    for r in table[:25]:
        print(f"  {r['module']:60s} {r['hidden_units']:8.2f} {r['per_layer_hidden_units']} {r['tensors']}")


if __name__ == "__main__":
    main()
