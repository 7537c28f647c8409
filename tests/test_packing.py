"""Padding-free packing computes the same loss and gradients as padded batches (fp32, CPU)."""
from __future__ import annotations

import types

import pytest
import torch

from ocrtune.data.registry import SAMPLE_DIR
from ocrtune.models.template import Template, collate
from ocrtune.train.data import EncodedDataset, parquet_rows
from ocrtune.train.loss import ResponseLoss
from ocrtune.models.patches.attention import _block_causal_mask
from ocrtune.data.packing import IGNORE_INDEX, mrope_positions, pack, token_budget_batches


@pytest.fixture(scope="module")
def encoded(tiny_model_dir):
    from ocrtune.models.loading import load_processor
    template = Template(load_processor(tiny_model_dir), "qwen2_vl", 2048)
    rows = parquet_rows(SAMPLE_DIR / "train.parquet", limit=6)
    ds = EncodedDataset(rows, template)
    samples = [ds[i] for i in range(len(ds))]
    assert all(s is not None for s in samples)
    return samples


def _model(tiny_model_dir, attn):
    from ocrtune.models.loading import load_model
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, torch.float32, attn)
    model.eval()  # no dropout: the two layouts must see the same function
    return model


def _assert_grads_close(g2, g1, tol=1e-5):
    assert g1.keys() == g2.keys() and len(g1) > 0
    for k in g1:
        rel = float((g2[k] - g1[k]).norm() / g1[k].norm().clamp_min(1e-30))
        assert rel <= tol, f"{k}: relative gradient difference {rel:.2e}"


def _loss_and_grads(model, batch):
    """Loss, response tokens and gradients of `batch`, its pixels restored as the trainer does (`to_device`: a
    loader worker's light pixels made the model's input, in the vision tower's dtype)."""
    from ocrtune.models.patches.vision import vision_input_dtype
    from ocrtune.data.pixels import to_device
    model.zero_grad(set_to_none=True)
    loss, n, _ = ResponseLoss(model, chunk_size=7)(**to_device(batch, "cpu", vision_input_dtype(model)))
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), int(n), grads


def test_mrope_positions_match_get_rope_index(tiny_model_dir, encoded):
    model = _model(tiny_model_dir, "sdpa")
    merge = model.config.vision_config.spatial_merge_size
    for s in encoded:
        ref, _ = model.model.get_rope_index(torch.tensor([s["input_ids"]]), torch.tensor([s["mm_token_type_ids"]]),
                                            s["image_grid_thw"])
        assert torch.equal(mrope_positions(s["mm_token_type_ids"], s["image_grid_thw"], merge), ref[:, 0])


def test_pack_layout(encoded):
    b = pack(encoded[:3], 0)
    lens = [len(s["input_ids"]) for s in encoded[:3]]
    assert b["input_ids"].shape == (1, sum(lens))
    assert b["position_ids"].shape == (4, 1, sum(lens))
    assert b["cu_seq_lens"].tolist() == [0, lens[0], lens[0] + lens[1], sum(lens)]
    assert int(b["max_length"]) == max(lens)
    starts = b["cu_seq_lens"][:-1].long()
    assert (b["position_ids"][0, 0, starts] == 0).all()  # text positions restart per sample
    assert (b["labels"][0, starts] == IGNORE_INDEX).all()
    assert b["image_grid_thw"].shape[0] == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_padded_loss_and_grads(tiny_model_dir, encoded, attn):
    """The core guarantee: a packed row is the same computation as a right-padded batch."""
    model = _model(tiny_model_dir, attn)
    model.requires_grad_(True)
    padded = collate(encoded, 0)
    packed = pack(encoded, 0)
    l1, n1, g1 = _loss_and_grads(model, padded)
    l2, n2, g2 = _loss_and_grads(model, packed)
    assert n1 == n2 > 0
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    _assert_grads_close(g2, g1)


def test_packed_equals_padded_with_lora(tiny_model_dir, encoded):
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import prepare_model
    model = prepare_model(_model(tiny_model_dir, "sdpa"), SftArgs(lora_dropout=0.0, gradient_checkpointing=True))
    with torch.no_grad():  # LoRA B starts at zero: give it values so the adapters matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.train()  # gradient checkpointing recomputes in backward: packing must survive it
    l1, _, g1 = _loss_and_grads(model, collate(encoded, 0))
    l2, _, g2 = _loss_and_grads(model, pack(encoded, 0))
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    assert all("lora" in k for k in g1)
    _assert_grads_close(g2, g1)


def test_response_loss_matches_hf_loss(tiny_model_dir, encoded):
    """ResponseLoss (padded and packed) is the model's own mean token cross-entropy."""
    model = _model(tiny_model_dir, "sdpa")
    padded = collate(encoded, 0)
    with torch.no_grad():
        ref = model(**padded).loss
        l1, n1, _ = ResponseLoss(model)(**padded)
        l2, n2, _ = ResponseLoss(model)(**pack(encoded, 0))
    torch.testing.assert_close(l1 / n1, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l2 / n2, ref, rtol=1e-5, atol=1e-6)


def test_block_causal_mask():
    m = _block_causal_mask(torch.tensor([0, 2, 5]), 5, "cpu")
    expect = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]).bool()
    assert torch.equal(m, expect)


def test_token_budget_batches():
    lengths = [100, 50, 300, 20, 80, 0, 120, 90]
    batches = token_budget_batches(lengths, 200, seed=1, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == [0, 1, 2, 3, 4, 6, 7]  # every non-empty row once; the empty one skipped
    for b in batches:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= 200
    assert batches == token_budget_batches(lengths, 200, seed=1, epoch=0)  # seeded: a resume replays it
    assert batches != token_budget_batches(lengths, 200, seed=1, epoch=1) or len(batches) == 1
    r0 = token_budget_batches(lengths, 200, 1, 0, rank=0, world=2)
    r1 = token_budget_batches(lengths, 200, 1, 0, rank=1, world=2)
    assert len(r0) == len(r1)


def test_collator_packs(encoded):
    from ocrtune.train.data import Collator
    b = Collator(0, packing=True)(list(encoded[:2]) + [None])
    assert b["input_ids"].shape[0] == 1 and "cu_seq_lens" in b


def test_bf16_lora_runs_in_bf16_under_autocast(tiny_model_dir, encoded):
    """bf16 model + float32 LoRA weights: the LoRA branch computes in bf16 (no float32 upcast of
    activations), gradients still reach the float32 LoRA weights, and the loss stays that of the
    float32 reference within bf16 tolerance."""
    from ocrtune.models.loading import load_model
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import prepare_model
    ref_model = prepare_model(_model(tiny_model_dir, "sdpa"), SftArgs(lora_dropout=0.0, gradient_checkpointing=False))
    model = prepare_model(load_model(tiny_model_dir, torch.bfloat16, "sdpa"), SftArgs(lora_dropout=0.0))
    assert any(p.requires_grad and p.dtype == torch.float32 for p in model.parameters())
    batch = pack(encoded, 0)
    loss_fn = ResponseLoss(model)
    model.train()
    loss, n, _ = loss_fn(**batch)
    loss.backward()
    assert loss_fn._amp == torch.bfloat16
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        ref, n_ref, _ = ResponseLoss(ref_model.eval())(**batch)
    assert int(n) == int(n_ref)
    assert abs(float(loss) - float(ref)) / float(ref) < 2e-2


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_packed_equals_padded_other_families(arch, tmp_path):
    """Qwen2.5-VL and Qwen3-VL go through their own forward; packing still changes nothing."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from families import build

    from ocrtune.models.loading import load_model, load_processor
    d = build(arch, str(tmp_path / arch))
    template = Template(load_processor(d), arch, 2048)
    ds = EncodedDataset(parquet_rows(SAMPLE_DIR / "train.parquet", limit=4), template)
    samples = [ds[i] for i in range(len(ds))]
    torch.manual_seed(0)
    model = load_model(d, torch.float32, "sdpa")
    model.eval()
    model.requires_grad_(True)
    l1, n1, g1 = _loss_and_grads(model, collate(samples, 0))
    packed = pack(samples, 0, model.config.vision_config.spatial_merge_size)
    l2, n2, g2 = _loss_and_grads(model, packed)
    assert n1 == n2 > 0
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
    _assert_grads_close(g2, g1)
    # one frame of each still image through the loader, repeated on the device: the very same computation
    from ocrtune.train.data import Collator
    frames = template.processor.image_processor.temporal_patch_size
    light = Collator(0, packing=True, frames=frames, light_pixels=True)(samples)
    assert light["pixel_values"].shape[1] * frames == packed["pixel_values"].shape[1] and int(light["pixel_frames"]) == frames
    l3, _, g3 = _loss_and_grads(model, light)
    assert torch.equal(l3, l2) and all(torch.equal(g3[k], g2[k]) for k in g2)
    # and as the loader's workers encode them, in 8 bits (this family's patch size, mean and std), restored on the way
    # to the device (`trainer.to_device`): the same computation again
    ds.light_pixels = True
    eight = Collator(0, packing=True, frames=frames, light_pixels=True)([ds[i] for i in range(len(ds))])
    assert eight["pixel_values"].dtype == torch.uint8 and eight["pixel_norm"].shape == (2, 3)
    l4, _, g4 = _loss_and_grads(model, eight)
    assert torch.equal(l4, l2) and all(torch.equal(g4[k], g2[k]) for k in g2)


def test_collator_sends_pixels_in_the_vision_towers_half_dtype_with_the_same_result(tiny_model_dir, encoded):
    """A bf16 vision tower casts its pixel values to bf16 before anything reads them, so the collator makes them
    bf16 in the loader workers (half the bytes to move): loss and gradients are bit-identical to float32 pixels.
    A float32 tower (CPU, float32 master weights) keeps float32 pixels."""
    from ocrtune.models.patches import vision
    from ocrtune.models.loading import load_model
    from ocrtune.train.data import Collator
    assert vision.vision_input_dtype(_model(tiny_model_dir, "sdpa")) is None
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, torch.bfloat16, "sdpa")
    model.eval()
    model.requires_grad_(True)
    half = vision.vision_input_dtype(model)
    assert half == torch.bfloat16
    full_batch, half_batch = Collator(0, packing=True)(list(encoded)), Collator(0, True, half)(list(encoded))
    assert full_batch["pixel_values"].dtype == torch.float32 and half_batch["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(half_batch["pixel_values"], full_batch["pixel_values"].to(torch.bfloat16))
    l1, n1, g1 = _loss_and_grads(model, full_batch)
    l2, n2, g2 = _loss_and_grads(model, half_batch)
    assert n1 == n2 > 0 and torch.equal(l1, l2)
    assert g1.keys() == g2.keys() and all(torch.equal(g1[k], g2[k]) for k in g1)
    assert any("visual" in k for k in g1)  # the vision tower's own gradients are among those compared


def test_sft_run_collates_pixels_in_its_vision_dtype(tmp_path, tiny_model_dir):
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    common = dict(model="tiny", dataset=["latex-ocr-sample#8"], max_steps=1, packing=True, report_to=["none"], dataset_test_ratio=0.25)
    bf16 = SftRun(SftArgs(output_dir=str(tmp_path / "bf16"), dtype="bfloat16", **common))
    assert bf16.collator.pixel_dtype == torch.bfloat16
    batch = next(bf16.micro_batches())[-1]
    assert batch["pixel_values"].dtype == torch.bfloat16 and "pixel_frames" not in batch  # no workers: plain input
    bf16.args.dataloader_num_workers = 2  # from worker processes: one frame of each image, repeated by the loss
    batch = next(bf16.micro_batches())[-1]  # (8 bits, one channel: the sample's images are gray)
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape[1] == 1
    assert int(batch["pixel_frames"]) == 2 and batch["pixel_norm"].shape == (2, 3)
    assert SftRun(SftArgs(output_dir=str(tmp_path / "fp32"), **common)).collator.pixel_dtype is None  # CPU: float32


def test_next_epochs_loader_starts_before_this_epoch_ends(tmp_path, tiny_model_dir, monkeypatch):
    """With loader workers, the next epoch's loader (its workers) starts 2 x workers micro-batches before this epoch
    ends, so the GPU doesn't wait at the boundary for fresh workers' first batch; the rows, in the order and with
    the epoch (augmentation seed) a workerless run reads them, are unchanged. A run whose last step comes first
    starts no loader for an epoch it won't reach."""
    from ocrtune.train import trainer as tr
    from ocrtune.train.args import SftArgs
    from ocrtune.data.pixels import model_pixels

    def stream(workers: int, max_steps: int = 100, epochs: int = 3) -> tuple[list, list]:
        run = tr.SftRun(SftArgs(model="tiny", dataset=["latex-ocr-sample#16"], max_steps=max_steps, batch_size=2, augment=True,
                                report_to=["none"], dataset_test_ratio=0.0, dataloader_num_workers=workers,
                                output_dir=str(tmp_path / f"{workers}_{max_steps}")))
        events, made = [], tr.make_loader
        monkeypatch.setattr(tr, "make_loader", lambda ds, *a: events.append(("loader", ds.epoch)) or made(ds, *a))
        rows = []
        for epoch, done, size, batch in run.micro_batches():
            run.state["global_step"] += 1  # as the training loop counts steps (one micro-batch a step)
            events.append(("batch", epoch, done, size))
            pixels = batch["pixel_values"]
            if "pixel_frames" in batch:  # made by a worker: light pixels (one frame, 8 bits)
                pixels = model_pixels(pixels, batch["pixel_frames"], batch.get("pixel_norm"))
            rows.append((epoch, batch["input_ids"], pixels))
            if (epoch, done) == (epochs - 1, size):
                return events, rows

    events, rows = stream(2)
    # 8 micro-batches an epoch; 2 workers: the next loader starts as the 4th from the end is handed out
    assert events.index(("loader", 1)) == events.index(("batch", 0, 4, 8)) - 1
    assert events.index(("loader", 2)) == events.index(("batch", 1, 4, 8)) - 1
    plain_events, plain_rows = stream(0)
    assert plain_events.index(("loader", 1)) == plain_events.index(("batch", 0, 8, 8)) + 1  # no workers: in turn
    assert [e for e, *_ in rows] == [e for e, *_ in plain_rows] == [0] * 8 + [1] * 8 + [2] * 8
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(rows, plain_rows))
    last_events, _ = stream(2, max_steps=8, epochs=1)  # the run ends with epoch 0
    assert ("loader", 1) not in last_events and len(last_events) == 9


def test_collator_sends_one_frame_of_each_still_image_with_the_same_result(tiny_model_dir, encoded):
    """The processor tiles each still image over the temporal patch (2 frames): the loader sends one and the loss
    module repeats it on the device; loss and gradients are bit-identical. Frames that differ (a video) are sent
    whole."""
    from ocrtune.data.pixels import all_frames, one_frame
    from ocrtune.train.data import Collator
    model = _model(tiny_model_dir, "sdpa")
    model.requires_grad_(True)
    full, light = Collator(0, True, None, 2)(list(encoded)), Collator(0, True, None, 2).for_workers()(list(encoded))
    assert "pixel_frames" not in full and int(light["pixel_frames"]) == 2  # in-process: a plain model input
    assert light["pixel_values"].shape == (full["pixel_values"].shape[0], full["pixel_values"].shape[1] // 2)
    assert torch.equal(all_frames(light["pixel_values"], 2), full["pixel_values"])
    l1, n1, g1 = _loss_and_grads(model, full)
    l2, n2, g2 = _loss_and_grads(model, light)
    assert n1 == n2 > 0 and torch.equal(l1, l2) and all(torch.equal(g1[k], g2[k]) for k in g1)
    moving = full["pixel_values"].clone().view(full["pixel_values"].shape[0], 3, 2, -1)
    moving[0, 0, 1, 0] += 1.0  # the second frame of one patch differs: nothing may be dropped
    assert one_frame(moving.view(full["pixel_values"].shape), 2) is None
    # frames are dropped sample by sample, before the batch is concatenated: one sample with moving frames keeps
    # the whole batch in the full layout (a batch has one), and its pixels arrive untouched
    samples = [dict(s) for s in encoded]
    video = samples[-1]["pixel_values"].clone().view(samples[-1]["pixel_values"].shape[0], 3, 2, -1)
    video[0, 0, 1, 0] += 1.0
    samples[-1]["pixel_values"] = video.view(samples[-1]["pixel_values"].shape)
    mixed = Collator(0, True, None, 2).for_workers()(samples)
    assert "pixel_frames" not in mixed and torch.equal(mixed["pixel_values"], Collator(0, True, None, 2)(samples)["pixel_values"])


def test_loader_workers_encode_light_pixels_and_batches_stay_the_same(tiny_model_dir, encoded):
    """In loader workers the dataset asks the processor for one frame of each still image in 8 bits, before its
    rescale and normalization (the tiling copy over the temporal patch and the float math were most of its time):
    normalized as `model_pixels` does it, the pixels are a full encode's first frame bit for bit, a gray image's in
    one channel; so are the batches, from workers (light) and in-process (plain); the token ids are the same too (the
    prompt segments' ids come from a cache after the first row)."""
    from ocrtune.models.loading import load_processor
    from ocrtune.data.pixels import model_pixels, one_frame
    from ocrtune.train.data import Collator, make_loader
    template = Template(load_processor(tiny_model_dir), "qwen2_vl", 2048)
    ds = EncodedDataset(parquet_rows(SAMPLE_DIR / "train.parquet", limit=6), template)
    ds.light_pixels = True
    single = [ds[i] for i in range(len(ds))]
    assert template._segment_ids  # the prompt segments were cached
    for s, full in zip(single, encoded):
        assert s["pixel_frames"] == 2 and s["pixel_values"].dtype == torch.uint8 and s["pixel_values"].shape[1] == 1
        assert torch.equal(model_pixels(s["pixel_values"], None, s["pixel_norm"]), one_frame(full["pixel_values"], 2))
        assert s["input_ids"] == full["input_ids"] and s["labels"] == full["labels"]
    collator = Collator(0, True, torch.bfloat16, 2)
    want_full, want_light = collator(list(encoded)), collator.for_workers()(list(encoded))
    got_full, got_light = collator(list(single)), collator.for_workers()(list(single))
    assert got_full.keys() == want_full.keys() and all(torch.equal(got_full[k], want_full[k]) for k in want_full)
    assert got_light["pixel_values"].dtype == torch.uint8 and want_light["pixel_values"].dtype == torch.bfloat16
    assert torch.equal(model_pixels(got_light["pixel_values"], 2, got_light["pixel_norm"], torch.bfloat16),
                       want_full["pixel_values"])
    assert all(torch.equal(got_light[k], want_light[k]) for k in want_light if k != "pixel_values")
    # a real loader with a worker: the worker's copy of the dataset encodes light pixels, the main process's does not
    ds.light_pixels = False
    batch = next(iter(make_loader(ds, [list(range(len(ds)))], collator, 1, False)))
    assert not ds.light_pixels and batch.keys() == got_light.keys()
    assert all(torch.equal(batch[k], got_light[k]) for k in got_light)


def test_eight_bit_pixels_give_the_model_the_same_loss_and_gradients(tiny_model_dir):
    """A batch of 8-bit pixels (gray and color images mixed: the gray one's channel repeated in the batch) restored by
    the loss module gives the loss and gradients of the plain batch, bit for bit, in float32 and with a bf16 model;
    an in-process collator restores light samples to the plain input."""
    import numpy as np
    from PIL import Image

    from ocrtune.models.loading import load_model, load_processor
    from ocrtune.train.data import Collator
    template = Template(load_processor(tiny_model_dir), "qwen2_vl", 2048)
    rng = np.random.default_rng(0)
    color = Image.fromarray(rng.integers(0, 256, (40, 120, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (28, 90), dtype=np.uint8)).convert("RGB")
    msgs = [{"role": "user", "content": "<image>Read it."}, {"role": "assistant", "content": "x ^ { 2 }"}]
    plain = [template.encode(msgs, [im]) for im in (gray, color)]
    light = [template.encode(msgs, [im], light_pixels=True) for im in (gray, color)]
    assert [s["pixel_values"].shape[1] for s in light] == [1, 3]
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = load_model(tiny_model_dir, dtype, "sdpa")
        model.eval()
        model.requires_grad_(True)
        half = dtype if dtype != torch.float32 else None
        collator = Collator(0, True, half, 2)
        want, got = collator(list(plain)), collator.for_workers()(list(light))
        assert got["pixel_values"].dtype == torch.uint8 and got["pixel_values"].shape[1] == 3
        assert torch.equal(collator(list(light))["pixel_values"], want["pixel_values"])  # in-process: plain
        with pytest.raises(ValueError, match="to_device"):  # unrestored, the model would read raw 8-bit values
            ResponseLoss(model)(**got)
        l1, n1, g1 = _loss_and_grads(model, want)
        l2, n2, g2 = _loss_and_grads(model, got)
        assert n1 == n2 > 0 and torch.equal(l1, l2) and all(torch.equal(g1[k], g2[k]) for k in g1)
        assert any("visual" in k for k in g1)


def test_worker_init_turns_light_pixels_on_only_under_our_collator(monkeypatch):
    from ocrtune.train import data
    ds = EncodedDataset([], None)
    monkeypatch.setattr(data, "_ignore_sigterm", lambda worker_id: None)  # (this process keeps its SIGTERM)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: types.SimpleNamespace(dataset=ds))
    data._init_worker(0, light_pixels=False)
    assert ds.light_pixels is False
    data._init_worker(0, light_pixels=True)
    assert ds.light_pixels is True


def _cat_in_worker(batch):
    from ocrtune.data.packing import shared_cat
    out = shared_cat(batch)
    return out, torch.tensor(out.is_shared())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_cat_writes_a_workers_batch_into_shared_memory(dtype):
    """In a loader worker the pixels' concatenation is allocated in shared memory (pickling it for the main process
    then copies nothing), with the values and shape of torch.cat; outside workers it is torch.cat itself."""
    from ocrtune.data.packing import shared_cat
    parts = [torch.randn(n, 6, generator=torch.Generator().manual_seed(n)).to(dtype) for n in (3, 5, 1)]
    loader = torch.utils.data.DataLoader(parts, batch_size=3, collate_fn=_cat_in_worker, num_workers=1)
    out, shared_in_worker = next(iter(loader))
    assert bool(shared_in_worker) and out.dtype == dtype and torch.equal(out, torch.cat(parts))
    here = shared_cat(parts)
    assert not here.is_shared() and torch.equal(here, torch.cat(parts))


def test_a_processor_without_eight_bit_output_falls_back_once(tiny_model_dir, encoded):
    """A processor that returns floats where 8 bits were asked for (e.g. transformers' PIL backend) gets one
    normalized frame sent instead, the same values as a plain encode's first frame; the template remembers and asks
    once an image from then on."""
    from ocrtune.models.loading import load_processor
    from ocrtune.data.pixels import one_frame
    template = Template(load_processor(tiny_model_dir), "qwen2_vl", 2048)
    ip, calls = template.processor.image_processor, []
    real = type(ip).__call__

    def floats_only(self, *args, **kw):  # 8 bits asked for: floats, as a processor without that option gives
        calls.append(kw)
        out = real(self, *args, **kw)
        if kw.get("do_normalize") is False:
            out["pixel_values"] = out["pixel_values"].float()
        return out
    ip.__class__ = type("FloatsOnly", (type(ip),), {"__call__": floats_only})
    ds = EncodedDataset(parquet_rows(SAMPLE_DIR / "train.parquet", limit=3), template)
    ds.light_pixels = True
    first, second = ds[0], ds[1]
    assert len(calls) == 3 and template._eight_bit is False  # 8 bits tried once, then one call an image
    for s, full in ((first, encoded[0]), (second, encoded[1])):
        assert "pixel_norm" not in s and s["pixel_frames"] == 2
        assert torch.equal(s["pixel_values"], one_frame(full["pixel_values"], 2))
