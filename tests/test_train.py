"""End-to-end LoRA training on the tiny model: it learns, the run folder is complete, and the saved
adapter is a plain PEFT adapter that reproduces the trained model's logits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ocrtune.data.registry import SAMPLE_DIR
from ocrtune.train.args import SftArgs
from ocrtune.train.trainer import SftRun
from tolerance import float32_atol, matmul_stages


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("overfit")
    rows = str(out / "rows16.parquet")
    pq.write_table(pq.read_table(SAMPLE_DIR / "train.parquet").slice(0, 16), rows)
    args = SftArgs(model="tiny", dataset=[rows], dataset_test_ratio=0, val_dataset=[rows],
                   max_steps=240, learning_rate=5e-3, lora_rank=16, lora_alpha=64, logging_steps=1, eval_steps=120,
                   output_dir=str(out), seed=7, predict_with_generate=True, max_new_tokens=96)
    run = SftRun(args)
    result = run.train()
    return run, result


def read_log(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "logging.jsonl").read_text().splitlines()]


def test_lora_overfits_16_rows(overfit_run):
    _, result = overfit_run
    train = [r for r in read_log(result["run_dir"]) if "loss" in r]
    start, end = train[0]["loss"], sum(r["loss"] for r in train[-5:]) / 5
    assert start > 5.0  # ~ln(vocab) for a random model
    assert end < 0.1 * start, (start, end)
    evals = [r for r in read_log(result["run_dir"]) if "eval_loss" in r]
    assert evals[-1]["eval_loss"] < 0.2 * start and evals[-1]["eval_acc"] > 0.8


def test_predict_with_generate_logs_and_plots_ocr_metrics(overfit_run):
    _, result = overfit_run
    evals = [r for r in read_log(result["run_dir"]) if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    for key in ("eval_bleu4", "eval_edit_distance_token", "eval_edit_distance_char", "eval_exact_match"):
        assert key in last and (Path(result["run_dir"]) / "images" / f"{key}.png").exists()
    assert last["eval_bleu4"] > 0.5 and last["eval_bleu4"] >= first["eval_bleu4"]
    assert last["eval_edit_distance_token"] < 0.5


def test_run_folder_has_every_artifact(overfit_run):
    _, result = overfit_run
    run_dir = Path(result["run_dir"])
    assert run_dir.parent.name == "tiny" and run_dir.name.startswith("v0-")
    args = json.loads((run_dir / "args.json").read_text())
    assert args["lora_rank"] == 16 and args["dataset"][0].endswith("rows16.parquet")
    assert list((run_dir / "runs").glob("events.out.tfevents.*"))
    for name in ("train_loss", "train_learning_rate", "eval_loss", "eval_acc", "train_memory"):
        with Image.open(run_dir / "images" / f"{name}.png") as im:
            assert im.size[0] > 300 and im.size[1] > 200
    record = read_log(run_dir)[0]
    for key in ("loss", "learning_rate", "grad_norm", "token_acc", "memory(GiB)", "elapsed_time", "remaining_time"):
        assert key in record
    ckpts = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in ckpts] == ["checkpoint-120", "checkpoint-240"]
    for f in ("adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt",
              "trainer_state.json"):
        assert (ckpts[-1] / f).exists(), f
    assert result["last_model_checkpoint"] == str(ckpts[-1])
    assert result["best_model_checkpoint"] == str(ckpts[-1])  # eval loss fell between the two evals


def test_adapter_loads_with_plain_peft_and_matches_training_logits(overfit_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    run, result = overfit_run
    batch = next(b for b in run.micro_batches() if b[-1] is not None)[-1]
    batch = {k: v for k, v in batch.items() if k != "labels"}
    trained = run.accelerator.unwrap_model(run.loss_module).model.eval()
    with torch.no_grad():
        expected = trained(**batch).logits
    base = AutoModelForImageTextToText.from_pretrained(run.model_dir)
    reloaded = PeftModel.from_pretrained(base, result["last_model_checkpoint"]).eval()
    with torch.no_grad():
        got = reloaded(**batch).logits
    # different kernels (fused LoRA addmm in training, PEFT's matmul + add here): not bit-equal, but
    # within float32 rounding of the language model's depth and width (see tests/tolerance.py)
    depth, width = matmul_stages(trained.config)
    torch.testing.assert_close(got, expected, rtol=0, atol=float32_atol(expected, depth, width))
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert not any("visual" in n for n, _ in reloaded.named_parameters() if "lora_" in n)  # freeze_vit


def test_plot_command_redraws(overfit_run, tmp_path):
    _, result = overfit_run
    images = Path(result["run_dir"]) / "images"
    (images / "train_loss.png").unlink()
    out = subprocess.run([sys.executable, "-m", "ocrtune", "plot", result["run_dir"]], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert (images / "train_loss.png").exists()


def test_full_finetuning_saves_a_loadable_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor
    args = SftArgs(model="tiny", dataset=["latex-ocr-sample#8"], train_type="full", freeze_vit=False, max_steps=3, eval_steps=3,
                   output_dir=str(tmp_path), dataset_test_ratio=0.25)
    result = SftRun(args).train()
    ckpt = Path(result["last_model_checkpoint"])
    model = AutoModelForImageTextToText.from_pretrained(ckpt)
    AutoProcessor.from_pretrained(ckpt)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    changed = lambda prefix: any(not torch.equal(p, base.state_dict()[n]) for n, p in model.state_dict().items() if n.startswith(prefix))
    assert changed("model.language_model") and changed("model.visual")


def test_freeze_vit_in_full_finetuning_keeps_vision_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForImageTextToText
    args = SftArgs(model="tiny", dataset=["latex-ocr-sample#8"], train_type="full", max_steps=2, eval_steps=2,
                   output_dir=str(tmp_path), dataset_test_ratio=0.25)
    result = SftRun(args).train()
    model = AutoModelForImageTextToText.from_pretrained(result["last_model_checkpoint"])
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir).state_dict()
    for n, p in model.state_dict().items():
        if n.startswith("model.visual"):
            assert torch.equal(p, base[n]), n


def test_sft_with_no_flags_fine_tunes_the_reader_on_handwriting(tmp_path):
    """No model given: the bundled reader with its first-run settings (the sample's handwriting rows, LoRA rank 32
    on all linears, batch 8, evaluated with generation); flags given win (here --max_steps and --eval_steps)."""
    env = {**os.environ, "OCRTUNE_CACHE": os.environ["OCRTUNE_CACHE"]}
    out = subprocess.run([sys.executable, "-m", "ocrtune", "sft", "--max_steps", "2", "--max_new_tokens", "24"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "last_model_checkpoint: " in out.stdout and "best_model_checkpoint: " in out.stdout
    runs = list((tmp_path / "output" / "ocrtune-reader").glob("v0-*"))
    assert len(runs) == 1 and (runs[0] / "checkpoint-2" / "adapter_model.safetensors").exists()
    assert out.stdout.splitlines()[0] == f"run folder: output/ocrtune-reader/{runs[0].name}"  # said before training
    saved = json.loads((runs[0] / "args.json").read_text())
    assert (saved["model"], saved["dataset"], saved["lora_rank"], saved["lora_alpha"], saved["batch_size"],
            saved["target_modules"], saved["predict_with_generate"], saved["max_pixels"], saved["max_steps"]) == (
        "ocrtune-reader", ["latex-ocr-sample-handwrite"], 32, 64, 8, ["all-linear"], True, 50_000, 2)
    evals = [json.loads(line) for line in (runs[0] / "logging.jsonl").read_text().splitlines() if "eval_bleu4" in line]
    assert len(evals) == 1 and evals[0]["step"] == 2 and 0 <= evals[0]["eval_bleu4"] <= 1
    assert "FutureWarning" not in out.stderr


def test_the_readers_first_run_settings_yield_to_flags_and_the_environment(monkeypatch, capsys):
    """ModelSpec.sft_defaults fill only what neither a flag nor an environment variable (MAX_PIXELS) gave."""
    import argparse

    from ocrtune.cli.parsing import add_dataclass_args, build
    from ocrtune.models.registry import get_model_spec
    from ocrtune.train.model_setup import model_defaults
    spec = get_model_spec("ocrtune-reader")

    def parsed(argv):
        p = argparse.ArgumentParser()
        add_dataclass_args(p, SftArgs)
        return model_defaults(build(SftArgs, p.parse_args(argv)), spec)

    a = parsed([])
    assert (a.dataset, a.lora_rank, a.max_pixels, a.num_train_epochs) == (["latex-ocr-sample-handwrite"], 32, 50_000, 8.0)
    a = parsed(["--lora_rank", "8", "--dataset", "latex-ocr-sample"])
    assert (a.lora_rank, a.dataset, a.batch_size) == (8, ["latex-ocr-sample"], 8)
    monkeypatch.setenv("MAX_PIXELS", "200704")
    assert parsed([]).max_pixels == 200704
    assert model_defaults(SftArgs(model="tiny"), get_model_spec("tiny")).lora_rank == 8  # tiny has none
    # the run says in one line what the model's settings decided, and only those
    monkeypatch.delenv("MAX_PIXELS")
    capsys.readouterr()
    p = argparse.ArgumentParser()
    add_dataclass_args(p, SftArgs)
    model_defaults(build(SftArgs, p.parse_args(["--lora_rank", "8"])), spec, announce=True)
    line = capsys.readouterr().err.strip()
    assert line.startswith("ocrtune-reader's first-run settings, where no flag gave them: --dataset "
                           "latex-ocr-sample-handwrite --lora_alpha 64"), line
    assert "--num_train_epochs 8.0" in line and "--predict_with_generate true" in line and "lora_rank" not in line


def test_no_validation_data_says_there_is_no_best_checkpoint(tmp_path, tiny_model_dir, capsys):
    result = SftRun(SftArgs(model="tiny", dataset=["latex-ocr-sample#4"], dataset_test_ratio=0, max_steps=1, output_dir=str(tmp_path),
                            report_to=["none"])).train()
    assert result["best_model_checkpoint"] is None
    assert "best_model_checkpoint: none (no evaluation ran: no validation data)" in capsys.readouterr().out


def test_swift_style_flags_and_env_vars(tmp_path):
    env = {**os.environ, "MAX_PIXELS": "6272", "MAX_STEPS": "2"}
    out = subprocess.run([sys.executable, "-m", "ocrtune", "sft", "--model_type", "tiny", "--sft_type", "lora",
                          "--dataset", "latex-ocr-sample#12", "--lora_target_modules", "q_proj,v_proj",
                          "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path), "--freeze_vit", "true"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    run = next((tmp_path / "tiny").glob("v0-*"))
    args = json.loads((run / "args.json").read_text())
    assert args["max_pixels"] == 6272 and args["max_steps"] == 2 and args["batch_size"] == 2
    assert args["target_modules"] == ["q_proj", "v_proj"] and args["train_type"] == "lora"
    adapter = json.loads((run / "checkpoint-2" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"}


def test_save_total_limit_keeps_best_and_newest(tmp_path):
    from ocrtune.checkpoint import STATE_FILE, list_checkpoints, rotate_checkpoints
    for step in (10, 20, 30, 40, 50):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_text("{}")
    (tmp_path / ".checkpoint-60.tmp").mkdir()  # an interrupted save is never counted or removed here
    rotate_checkpoints(tmp_path, 2, best=tmp_path / "checkpoint-20")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-50"]
    rotate_checkpoints(tmp_path, 1, best=tmp_path / "checkpoint-20")  # limit 1 still keeps best and newest
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-50"]


def test_run_given_its_datasets_trains_on_them(tmp_path, tiny_model_dir):
    """SftRun(args, data=builder): the run trains on the rows it is given (no `args.dataset` read),
    the way bench/bench_sft.py builds its runs."""
    from ocrtune.train.data import parquet_rows, rows_data
    rows = parquet_rows(str(SAMPLE_DIR / "train.parquet"), limit=6)
    called = []

    def data(args, template, accelerator):
        called.append(template)
        return rows_data(rows, rows[:2])(args, template, accelerator)

    args = SftArgs(model="tiny", dataset=["no-such-dataset-is-read"], max_steps=2, batch_size=2, eval_steps=2, logging_steps=1,
                   output_dir=str(tmp_path), report_to=["none"])
    run = SftRun(args, data=data)
    assert len(called) == 1 and called[0] is run.template
    assert run.train_ds.rows is rows and len(run.val_ds) == 2
    # the given args are not rewritten: the defaults resolved at start live in run.resolved (and run.args, args.json)
    assert args.learning_rate is None and args.save_steps is None and args.use_liger is None
    assert run.resolved.learning_rate == 1e-3 and run.resolved.save_steps == 2 and run.resolved.use_liger is False
    assert (run.args.learning_rate, run.args.save_steps, run.args.use_liger) == (1e-3, 2, False)
    result = run.train()
    assert result["global_step"] == 2
    log = read_log(result["run_dir"])
    assert [r["step"] for r in log if "loss" in r] == [1, 2] and any("eval_loss" in r for r in log)
    assert (Path(result["run_dir"]) / "checkpoint-2" / "adapter_model.safetensors").exists()
    saved = json.loads((Path(result["run_dir"]) / "args.json").read_text())
    assert (saved["learning_rate"], saved["save_steps"], saved["use_liger"]) == (1e-3, 2, False)


def _redrawn(args, model_dir, dtype):
    """A model builder for SftRun(model=...): the tiny preset with its language model's matrices
    drawn again from seed 1234, so its weights are none of the folder's."""
    from ocrtune.models.loading import load_model
    model = load_model(model_dir, dtype, args.attn_impl)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_run_given_its_model_trains_that_model(tmp_path, tiny_model_dir):
    """SftRun(args, model=builder): the given model (not the weights in args.model's folder) is the base
    under the LoRA wrap, its loss falls, and the saved adapter reproduces the trained logits over that
    model and not over the folder's weights."""
    from peft import PeftModel

    from ocrtune.compat import quiet_peft_deprecations
    from ocrtune.models.loading import load_model
    from ocrtune.models.patches.common import causal_lm
    from ocrtune.train.data import parquet_rows, rows_data
    calls = []

    def builder(args, model_dir, dtype):
        calls.append((args, model_dir, dtype, _redrawn(args, model_dir, dtype)))
        return calls[-1][-1]

    rows = parquet_rows(str(SAMPLE_DIR / "train.parquet"), limit=2)
    args = SftArgs(model=str(tiny_model_dir), max_steps=3, batch_size=2, learning_rate=5e-3, warmup_ratio=0,
                   logging_steps=1, output_dir=str(tmp_path), report_to=["none"])
    run = SftRun(args, data=rows_data(rows), model=builder)
    (given_args, model_dir, dtype, given), = calls
    assert given_args is run.args and Path(model_dir) == Path(tiny_model_dir) and dtype == torch.float32
    assert causal_lm(run.model) is given  # the base the adapters wrap is the given model itself
    embed = lambda m: m.model.language_model.embed_tokens.weight  # noqa: E731
    assert not torch.equal(embed(given), embed(load_model(tiny_model_dir, torch.float32)))
    result = run.train()
    losses = [r["loss"] for r in read_log(result["run_dir"]) if "loss" in r]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2] and losses[2] < 0.9 * losses[0], losses
    assert torch.equal(embed(given), embed(_redrawn(args, tiny_model_dir, torch.float32)))  # LoRA: base frozen

    batch = {k: v for k, v in run.collator([run.train_ds[i] for i in range(2)]).items() if k != "labels"}
    trained = run.accelerator.unwrap_model(run.loss_module).model.eval()
    ckpt = result["last_model_checkpoint"]
    with torch.no_grad(), quiet_peft_deprecations():
        expected = trained(**batch).logits
        on_given = PeftModel.from_pretrained(_redrawn(args, tiny_model_dir, torch.float32), ckpt).eval()(**batch).logits
        on_folder = PeftModel.from_pretrained(load_model(tiny_model_dir, torch.float32), ckpt).eval()(**batch).logits
    depth, width = matmul_stages(trained.config)
    atol = float32_atol(expected, depth, width)
    torch.testing.assert_close(on_given, expected, rtol=0, atol=atol)
    assert (on_folder - expected).abs().max() > 100 * atol


def test_run_refuses_a_given_model_it_cannot_honour(tmp_path, tiny_model_dir):
    """Where a given model can't be used (--device_map placement, a shape-only folder, a full-weight
    resume, a model already PEFT-wrapped) the run stops with a UserError and writes nothing."""
    import shutil

    from ocrtune.errors import UserError
    from ocrtune.models.presets import RANDOM_INIT_MARK
    from ocrtune.train.data import parquet_rows, rows_data
    from ocrtune.train.model_setup import check_given_model
    rows = parquet_rows(str(SAMPLE_DIR / "train.parquet"), limit=2)
    out = tmp_path / "out"

    def run(builder, **kw):
        SftRun(SftArgs(max_steps=1, batch_size=1, output_dir=str(out), report_to=["none"], **kw),
               data=rows_data(rows), model=builder)

    def never(*a):
        raise AssertionError("the model builder ran")

    with pytest.raises(UserError, match="--device_map auto splits the model the run loads"):
        run(never, model=str(tiny_model_dir), device_map="auto")
    shape_only = tmp_path / "tiny_meta"
    shutil.copytree(tiny_model_dir, shape_only, ignore=shutil.ignore_patterns("*.safetensors"))
    (shape_only / RANDOM_INIT_MARK).write_text("")
    with pytest.raises(UserError, match="shape-only"):
        run(never, model=str(shape_only))
    with pytest.raises(UserError, match="holds the full model weights"):
        check_given_model(SftArgs(model="tiny", train_type="full"), tiny_model_dir, tmp_path / "checkpoint-2")
    from peft import LoraConfig, get_peft_model

    from ocrtune.compat import quiet_peft_deprecations

    def wrapped(args, model_dir, dtype):
        with quiet_peft_deprecations():
            return get_peft_model(_redrawn(args, model_dir, dtype), LoraConfig(target_modules=["q_proj"]))

    with pytest.raises(UserError, match="already has PEFT adapters"):
        run(wrapped, model=str(tiny_model_dir))
    assert not list(out.glob("**/args.json"))


def test_vit_and_aligner_learning_rates_are_their_own_groups(tiny_model_dir):
    """--vit_lr / --aligner_lr (ms-swift's flags): the vision tower's and the merger's parameters train at
    their own peak rates, kept through the schedule (warm-up scales every group alike); without them the
    optimizer is the usual two groups."""
    from ocrtune.models.loading import load_model
    from ocrtune.models.patches.common import causal_lm
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import make_optimizer, prepare_model
    model = prepare_model(load_model(tiny_model_dir, torch.float32, "sdpa"),
                          SftArgs(train_type="full", freeze_vit=False, gradient_checkpointing=False))
    visual = causal_lm(model).model.visual
    merger = {id(p) for p in visual.merger.parameters()}
    vit = {id(p) for p in visual.parameters()} - merger
    plain, _ = make_optimizer(model, SftArgs(learning_rate=1e-3), 10)
    assert len(plain.param_groups) == 2 and {g["initial_lr"] for g in plain.param_groups} == {1e-3}
    args = SftArgs(learning_rate=1e-3, vit_lr=1e-4, aligner_lr=5e-4, warmup_steps=4)
    opt, sched = make_optimizer(model, args, 10)
    lr_of = {id(p): g["initial_lr"] for g in opt.param_groups for p in g["params"]}  # the peak rates
    assert len(lr_of) == sum(1 for p in model.parameters() if p.requires_grad)
    assert {lr_of[i] for i in vit} == {1e-4} and {lr_of[i] for i in merger} == {5e-4}
    assert {lr for i, lr in lr_of.items() if i not in vit | merger} == {1e-3}
    for _ in range(2):  # half-way through the warm-up: every group at half its peak
        opt.step()
        sched.step()
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == [5e-5, 2.5e-4, 5e-4]


def test_modules_to_save_trains_the_tied_embeddings_saves_and_merges_them(tmp_path, tiny_model_dir):
    """--modules_to_save embed_tokens (ms-swift's flag): a whole trained copy of the embeddings beside the LoRA
    weights; on the tied tiny model lm_head is that same copy; the adapter file holds it, plain PEFT reloads it,
    and the merged model is one tied matrix with the trained values."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from ocrtune.export.merge import merge_lora
    args = SftArgs(model="tiny", dataset=["latex-ocr-sample#8"], max_steps=3, eval_steps=3, output_dir=str(tmp_path),
                   dataset_test_ratio=0.25, modules_to_save=["embed_tokens"], learning_rate=1e-2)
    ckpt = Path(SftRun(args).train()["last_model_checkpoint"])
    saved = load_file(ckpt / "adapter_model.safetensors")
    embed_keys = [k for k in saved if "embed_tokens" in k]
    assert len(embed_keys) == 1 and any("lora_B" in k for k in saved)
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    before = base.get_input_embeddings().weight.detach().clone()
    trained = saved[embed_keys[0]]
    assert trained.shape == before.shape
    moved = (trained - before).abs().amax(dim=1) > 0  # rows of the tokens the 3 steps saw (and their logits)
    assert moved.sum() > 10, int(moved.sum())

    reloaded = PeftModel.from_pretrained(base, ckpt).eval()
    assert torch.equal(reloaded.get_output_embeddings().weight, trained)  # the tie holds in the reloaded model
    ids = torch.arange(2, 40).unsqueeze(0)
    with torch.no_grad():
        expected = reloaded(input_ids=ids).logits
    merged = AutoModelForImageTextToText.from_pretrained(merge_lora(ckpt)).eval()
    assert merged.get_input_embeddings().weight.data_ptr() == merged.get_output_embeddings().weight.data_ptr()
    assert torch.equal(merged.get_input_embeddings().weight, trained)
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    depth, width = matmul_stages(merged.config)
    torch.testing.assert_close(got, expected, rtol=0, atol=float32_atol(expected, depth, width))


def test_modules_to_save_names_a_module_the_model_has(tmp_path):
    from ocrtune.errors import UserError
    with pytest.raises(UserError, match="no module of that name"):
        SftRun(SftArgs(model="tiny", dataset=["latex-ocr-sample#8"], max_steps=1, output_dir=str(tmp_path),
                       modules_to_save=["embed_tokenz"])).train()
    with pytest.raises(UserError, match="goes with --train_type lora"):
        SftRun(SftArgs(model="tiny", dataset=["latex-ocr-sample#8"], max_steps=1, output_dir=str(tmp_path), train_type="full",
                       modules_to_save=["embed_tokens"])).train()


def test_a_run_that_builds_the_preset_trains_as_one_that_loads_it(tmp_path):
    """--seed decides the adapters' initial weights even when the run builds the preset first (which seeds and draws
    its own random weights): the first run on an empty cache and the second, loading the cached preset, match."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file
    env = {**os.environ, "OCRTUNE_CACHE": str(tmp_path / "cache")}
    runs = []
    for name in ("builds", "loads"):
        res = subprocess.run([sys.executable, "-m", "ocrtune", "sft", "--model", "tiny", "--dataset", "latex-ocr-sample#16", "--max_steps", "2",
                              "--batch_size", "4", "--lora_dropout", "0", "--logging_steps", "1", "--report_to", "none",
                              "--dataset_test_ratio", "0.25", "--seed", "5", "--output_dir", str(tmp_path / name)],
                             capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(next((tmp_path / name / "tiny").glob("v*-*")))
    logs = [[(r["loss"], r["grad_norm"]) for r in map(json.loads, (run / "logging.jsonl").read_text().splitlines()) if "loss" in r]
            for run in runs]
    assert logs[0] == logs[1]  # the gradient norm of step 1 depends on the adapters' A (B starts at zero)
    a, b = (load_file(run / "checkpoint-2" / "adapter_model.safetensors") for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
