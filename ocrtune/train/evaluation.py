"""The evaluations between training steps: the validation loss and token accuracy (`evaluate`), and with
--predict_with_generate the generated answers' metrics (`generate_metrics`), on every rank alike."""
from __future__ import annotations

import contextlib

import torch

from ocrtune.data.pixels import to_device
from ocrtune.train import distributed as dist
from ocrtune.train.data import first_good, make_loader


def evaluate(acc, loss_module, val_ds, collator, args, train_filler, processor=None, template=None,
             sharded: bool = False) -> dict:
    """{eval_loss, eval_acc} over `val_ds` (and the generated answers' metrics with --predict_with_generate).
    `train_filler()`: a batch that stands in for one whose rows all failed, where no validation row encodes."""
    # eager under --torch_compile: no-grad passes (and generation's cache) would compile every block again
    with torch.compiler.set_stance("force_eager") if args.torch_compile else contextlib.nullcontext():
        metrics = _loss_and_accuracy(acc, loss_module, val_ds, collator, args, train_filler)
        if args.predict_with_generate:
            metrics.update(generate_metrics(acc, loss_module, val_ds.rows, processor, template, args, sharded))
    return metrics


@torch.no_grad()
def _loss_and_accuracy(acc, loss_module, val_ds, collator, args, train_filler) -> dict:
    loss_module.eval()
    loss, tokens, correct = 0.0, 0, 0
    filler = None
    bs = args.eval_batch_size or args.batch_size
    # each row once, no wrap-around; every rank the same number of forward passes (collectives under sharding)
    shares = dist.even_batches(len(val_ds), acc.process_index, acc.num_processes, bs)
    loader = make_loader(val_ds, [b for b, _ in shares], collator, args.dataloader_num_workers, False)
    for (_, real), batch in zip(shares, loader):
        if batch is None:  # every row failed to encode: a filler pass keeps the ranks' forwards in step
            if acc.num_processes == 1:
                continue
            batch, real = filler or first_good(val_ds, collator) or train_filler(), False
        else:
            filler = batch
        batch = to_device(batch, acc.device, collator.pixel_dtype)
        with acc.autocast():
            l, n, c = loss_module(**batch)
        if real:
            loss, tokens, correct = loss + float(l), tokens + int(n), correct + int(c)
    totals = torch.tensor([loss, tokens, correct], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        totals = acc.reduce(totals, "sum")
    loss, tokens, correct = totals.tolist()
    return {"eval_loss": round(loss / max(tokens, 1), 6), "eval_acc": round(correct / max(tokens, 1), 6)}


@torch.no_grad()
def generate_metrics(acc, loss_module, rows, processor, template, args, sharded: bool) -> dict:
    """Every rank generates its share of the validation rows (the same number of batches on each,
    so sharded forward passes line up); rank 0's metrics cover all rows once."""
    from accelerate.utils import gather_object

    from ocrtune.evaluate.metrics import compute_metrics
    from ocrtune.models.generate import InferEngine
    model = acc.unwrap_model(loss_module).model
    # the dynamic loop: a CUDA graph of the training model (autocast, hooks, training-time patches) is untried
    engine = InferEngine(dist.SyncedGenerate(model) if sharded else model, processor, template, decode="dynamic")
    bs = args.eval_batch_size or args.batch_size
    mine = []
    with dist.full_params(loss_module), acc.unwrap_model(loss_module).autocast(acc.device.type):
        if acc.num_processes == 1:  # the inference engine's length-sorted, encoded-ahead batches
            mine = list(enumerate(engine.generate_rows(rows, bs, args.max_new_tokens)))
        else:
            for batch, real in dist.even_batches(len(rows), acc.process_index, acc.num_processes, bs):
                preds = engine.generate([rows[i] for i in batch], args.max_new_tokens)
                mine += list(zip(batch, preds)) if real else []
    pairs = dict(gather_object(mine)) if acc.num_processes > 1 else dict(mine)
    preds = [pairs[i] for i in range(len(rows))]
    refs = [r["messages"][-1]["content"] for r in rows]
    m = compute_metrics(preds, refs, args.generate_metrics, tex_root=args.tex_root)
    return {f"eval_{k}": round(v, 6) for k, v in m.items() if k != "count"}
