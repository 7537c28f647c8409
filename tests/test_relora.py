"""--relora_steps: folding keeps the model's function, restarts the adapters and their optimizer state;
a run's checkpoints carry the folded base, which inference, merge and resume (bit-identical) load."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ocrtune.checkpoint import BASE_OVERLAY
from ocrtune.train import relora

FLAGS = ["--model", "tiny", "--dataset", "latex-ocr-sample#24", "--max_steps", "6", "--batch_size", "2", "--save_steps", "1",
         "--eval_steps", "3", "--logging_steps", "1", "--seed", "3", "--dataset_test_ratio", "0.1", "--report_to", "none",
         "--relora_steps", "2", "--relora_warmup_steps", "2", "--learning_rate", "1e-2", "--save_total_limit", "10"]


def lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from ocrtune.models.loading import load_model
    torch.manual_seed(0)
    model = get_peft_model(load_model(tiny_model_dir, torch.float32), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # a trained adapter: its update is not zero
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_fold_keeps_the_function_and_restarts_adapters_and_their_moments(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    ids = torch.randint(10, 500, (2, 12))
    before = logits(model, ids)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    before = logits(model, ids)
    bases = {k: v.clone() for k, v in relora.base_overlay(model).items()}
    a_before = {n: p.clone() for n, p in model.named_parameters() if "lora_A" in n}
    assert len(opt.state) == len(params)

    n = relora.fold_and_restart(model, opt, seed=7)

    assert n == 2 * 2  # q_proj and down_proj of the tiny model's two layers
    # the function is kept: base + B A before equals the new base (+ 0) after, to float32 rounding of a sum
    assert torch.allclose(logits(model, ids), before, atol=1e-5, rtol=1e-5)
    after = relora.base_overlay(model)
    assert all(not torch.equal(after[k], bases[k]) for k in bases)  # every base weight took its update
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert not p.any()
        if "lora_A" in name:
            assert not torch.equal(p, a_before[name])  # redrawn
    assert len(opt.state) == 0  # every trained parameter here is an adapter's: all their moments dropped
    # the redraw is seeded: the same on every rank
    other = lora_model(tiny_model_dir)
    relora.fold_and_restart(other, torch.optim.AdamW([p for p in other.parameters() if p.requires_grad]), seed=7)
    assert all(torch.equal(a, b) for (na, a), (nb, b) in zip(model.named_parameters(), other.named_parameters()) if "lora_A" in na)


def test_lr_factor_warms_up_after_each_restart():
    f = [relora.lr_factor(d, 4, 2) for d in range(10)]
    assert f == [1, 1, 1, 1, 0.5, 1, 1, 1, 0.5, 1]
    assert relora.lr_factor(5, 0, 2) == 1.0


def sft(out: Path, *extra):
    proc = subprocess.run([sys.executable, "-m", "ocrtune", "sft", *FLAGS, "--output_dir", str(out), *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("relora")
    proc = sft(out)
    assert "folded into their base weights and restarted at step 4" in proc.stderr + proc.stdout
    return next((out / "tiny").glob("v*-*"))


def runtime_params(folder):
    from ocrtune.models.loading import load_model
    return dict(load_model(folder, torch.float32).named_parameters())


def test_checkpoints_carry_the_folded_base_and_inference_loads_it(uninterrupted, tiny_model_dir):
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.load import load_for_inference
    base = runtime_params(tiny_model_dir)
    ckpt = uninterrupted / "checkpoint-6"
    overlay = load_file(ckpt / BASE_OVERLAY)
    assert all(not torch.equal(v, base[k]) for k, v in overlay.items())  # two folds moved every wrapped weight
    first = load_file(uninterrupted / "checkpoint-1" / BASE_OVERLAY)  # before the first fold: the model's own base
    assert first.keys() == overlay.keys() and all(torch.equal(v, base[k]) for k, v in first.items())

    engine, _ = load_for_inference(InferArgs(ckpt_dir=str(ckpt)))
    got = dict(engine.model.named_parameters())
    for k, v in overlay.items():
        assert torch.equal(got[f"base_model.model.{k[:-len('.weight')]}.base_layer.weight"].float(), v.float()), k


def test_merge_writes_the_folded_base_plus_the_last_adapter(uninterrupted, tmp_path):
    from ocrtune.export.merge import merge_lora
    ckpt = uninterrupted / "checkpoint-5"  # one step after the second fold: a non-zero adapter over a folded base
    adapter = load_file(ckpt / "adapter_model.safetensors")
    overlay = load_file(ckpt / BASE_OVERLAY)
    merged = runtime_params(merge_lora(ckpt, output_dir=tmp_path / "m", dtype="float32"))
    for k, v in overlay.items():
        layer = f"base_model.model.{k[:-len('.weight')]}"
        a, b = adapter[f"{layer}.lora_A.weight"], adapter[f"{layer}.lora_B.weight"]
        assert b.abs().max() > 0
        # the sft defaults: lora_alpha 32 / rank 8 = scaling 4
        assert torch.allclose(merged[k], v.float() + 4.0 * (b.float() @ a.float()), atol=1e-6), k


def test_resume_across_folds_is_bit_identical(uninterrupted, tmp_path):
    sft(tmp_path, "--max_time", "0")  # stops after step 1
    sft(tmp_path, "--resume_from_checkpoint", "last", "--max_time", "0")  # step 2 (a fold), saved with its base
    run = next((tmp_path / "tiny").glob("v*-*"))
    assert (run / "checkpoint-2" / BASE_OVERLAY).exists()
    sft(tmp_path, "--resume_from_checkpoint", "last")
    for name in ("adapter_model.safetensors", BASE_OVERLAY):
        ref, got = load_file(uninterrupted / "checkpoint-6" / name), load_file(run / "checkpoint-6" / name)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name


def test_relora_is_refused_where_it_cannot_fold():
    from ocrtune.errors import UserError
    from ocrtune.train.args import SftArgs, validate
    for bad in (dict(train_type="full"), dict(fsdp="full_shard auto_wrap"), dict(fp8_base=True)):
        with pytest.raises(UserError, match="relora_steps"):
            validate(SftArgs(relora_steps=10, **bad))


def test_a_damaged_or_foreign_base_overlay_is_a_one_line_error(uninterrupted, tmp_path, tiny_model_dir):
    import shutil

    from ocrtune.checkpoint import load_base_overlay
    from ocrtune.errors import UserError
    from ocrtune.models.loading import load_model
    ckpt = tmp_path / "checkpoint-6"
    shutil.copytree(uninterrupted / "checkpoint-6", ckpt)
    model = load_model(tiny_model_dir, torch.float32)
    data = (ckpt / BASE_OVERLAY).read_bytes()
    (ckpt / BASE_OVERLAY).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="relora_base.safetensors"):
        load_base_overlay(model, ckpt)
    with pytest.raises(UserError, match="does not fit the base model"):
        load_base_overlay(model, ckpt, {"model.no_such.weight": torch.zeros(2)})
