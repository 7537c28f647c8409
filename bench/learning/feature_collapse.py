"""Why the from-scratch preset does not read: its image features collapse (issue 13). CPU, a few minutes.

Trains the `small` preset on images of 4-digit numbers (sweep_reading.py's digits task, first 256 rows,
batches of 16, AdamW) and every 10 steps measures, on 8 fixed images, the merged image features that go
into the language model: mean cosine similarity between the same token position in different images,
between different positions of the same image, and the mean feature norm. At init they are 0.93 / 0.92 /
9.2; at lr 1e-3 both reach 1.0000 within 10 steps while the norm grows to ~600: every image token becomes the
same vector, and there is nothing left to read.

    python bench/learning/feature_collapse.py --lr 1e-3
    python bench/learning/feature_collapse.py --lr 1e-3 --vision_lr_mult 0.1
    python bench/learning/feature_collapse.py --lr 1e-3 --freeze_merger_out   # also: --zero_merger_bias, --vision_wd 0.1, --center_grad
"""
from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--vision_lr_mult", type=float, default=1.0)
    p.add_argument("--vision_wd", type=float, default=0.0)
    p.add_argument("--freeze_merger_out", action="store_true", help="the merger's last Linear stays at its init")
    p.add_argument("--zero_merger_bias", action="store_true", help="the merger's last bias is 0 and frozen")
    p.add_argument("--center_grad", action="store_true", help="subtract the mean over image tokens from the "
                   "features' gradient (no common shift is learned through them)")
    a = p.parse_args(argv)
    import torch
    from sweep_reading import DEFAULTS, build, digit_task, encode

    from ocrtune.models.template import collate
    from ocrtune.train.loss import ResponseLoss
    _, model = build("small", DEFAULTS, "cpu")
    enc, _, pad = encode(types.SimpleNamespace(preset="small", max_pixels=120000, min_pixels=None),
                         (digit_task()[0][:256], []))
    probe = collate(enc[:8], pad)
    last = model.model.visual.merger.mlp[-1]
    if a.freeze_merger_out:
        last.requires_grad_(False)
    if a.zero_merger_bias:
        torch.nn.init.zeros_(last.bias)
        last.bias.requires_grad_(False)
    plain = model.model.get_image_features

    def features(self, *args, **kw):
        out = plain(*args, **kw)
        f = out.pooler_output
        f = torch.cat(list(f)) if isinstance(f, (list, tuple)) else f
        if a.center_grad and f.requires_grad:
            f.register_hook(lambda g: g - g.mean(0, keepdim=True))
        out.pooler_output = f
        return out
    model.model.get_image_features = types.MethodType(features, model.model)

    def stats():
        with torch.no_grad():
            f = model.model.get_image_features(probe["pixel_values"], probe["image_grid_thw"]).pooler_output
            f = f.view(8, -1, f.shape[-1])  # every probe image has the same grid
            n = torch.nn.functional.normalize(f, dim=-1)
            other_image = torch.einsum("itd,jtd->ijt", n, n).mean(-1)[~torch.eye(8, dtype=torch.bool)].mean()
            other_pos = torch.einsum("itd,isd->its", n, n)[:, ~torch.eye(f.shape[1], dtype=torch.bool)].mean()
            return f"cos(other image) {other_image:.4f} cos(other position) {other_pos:.4f} norm {f.norm(dim=-1).mean():.1f}"
    vision = [q for n, q in model.named_parameters() if "visual" in n and q.requires_grad]
    ids = {id(q) for q in vision}
    lm = [q for q in model.parameters() if id(q) not in ids and q.requires_grad]
    opt = torch.optim.AdamW([{"params": vision, "lr": a.lr * a.vision_lr_mult, "weight_decay": a.vision_wd},
                             {"params": lm, "lr": a.lr, "weight_decay": 0.0}], betas=(0.9, 0.95))
    loss_fn, gen = ResponseLoss(model), torch.Generator().manual_seed(1)
    print(f"{vars(a)}\nstep 0: {stats()}", flush=True)
    for step in range(1, a.steps + 1):
        idx = torch.randint(0, len(enc), (16,), generator=gen).tolist()
        loss, n, _ = loss_fn(**collate([enc[i] for i in idx], pad))
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 10 == 0:
            print(f"step {step}: loss {loss.item() / int(n):.3f} {stats()}", flush=True)


if __name__ == "__main__":
    main()
