"""Every bad input ends with exit status 2 and one line naming the problem, never a traceback.
Each case runs the real CLI in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ocrtune.data.registry import OCR_PROMPT, SAMPLE_DIR


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir):
    d = tmp_path_factory.mktemp("bad")
    row = pq.read_table(SAMPLE_DIR / "train.parquet").slice(0, 1).to_pylist()[0]
    good_png = d / "good.png"
    good_png.write_bytes(row["image"]["bytes"])
    (d / "notimage.png").write_text("this is text, not a PNG")
    (d / "truncated.png").write_bytes(row["image"]["bytes"][: len(row["image"]["bytes"]) // 2])
    Image.new("1", (12000, 8000)).save(d / "bomb.png")
    Image.new("L", (300000, 1), 0).save(d / "wide.png")  # 370 bytes; padding it used to take 1.8 GB
    (d / "empty.png").write_bytes(b"")
    (d / "imgdir").mkdir()

    def jsonl(name, recs):
        p = d / name
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(p)

    ok = {"query": "<image>" + OCR_PROMPT, "response": row["text"], "images": [str(good_png)]}
    f = {
        "missing_img": jsonl("missing_img.jsonl", [{**ok, "images": [str(d / "nope.png")]}]),
        "notimage": jsonl("notimage.jsonl", [{**ok, "images": [str(d / "notimage.png")]}]),
        "truncated": jsonl("truncated.jsonl", [{**ok, "images": [str(d / "truncated.png")]}]),
        "bomb": jsonl("bomb.jsonl", [{**ok, "images": [str(d / "bomb.png")]}]),
        "wide": jsonl("wide.jsonl", [{**ok, "images": [str(d / "wide.png")]}]),
        "emptyimg": jsonl("emptyimg.jsonl", [{**ok, "images": [str(d / "empty.png")]}]),
        "dirimg": jsonl("dirimg.jsonl", [{**ok, "images": [str(d / "imgdir")]}]),
        "empty_resp": jsonl("empty_resp.jsonl", [{**ok, "response": ""}]),
        "num_resp": jsonl("num_resp.jsonl", [{**ok, "response": 5}]),
        "bad_role": jsonl("bad_role.jsonl", [{"messages": [{"role": "robot", "content": "<image>x"},
                                                           {"role": "assistant", "content": "y"}], "images": [str(good_png)]}]),
        "too_many_tags": jsonl("tags.jsonl", [{**ok, "query": "<image><image>two"}]),
        "bad_columns": jsonl("cols.jsonl", [{"question": "x", "answer": "y"}]),
        "all_bad": jsonl("all_bad.jsonl", [{**ok, "images": [str(d / "nope.png")]}] * 3),
        "good": jsonl("good.jsonl", [ok] * 4),
    }
    (d / "malformed.jsonl").write_text('{"query": "x", "response": \n')
    f["malformed"] = str(d / "malformed.jsonl")
    (d / "data.txt").write_text("hello")
    f["txt"] = str(d / "data.txt")
    (d / "emptydir").mkdir()
    f["emptydir"] = str(d / "emptydir")
    (d / "noconfig").mkdir()
    f["noconfig"] = str(d / "noconfig")
    (d / "badconfig").mkdir()
    (d / "badconfig" / "config.json").write_text('{"model_type": "qwen2_vl",')  # cut short
    f["badconfig"] = str(d / "badconfig")
    bert = d / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    f["bert"] = str(bert)
    noweights = d / "noweights"
    noweights.mkdir()
    for name in os.listdir(tiny_model_dir):
        if not name.endswith(".safetensors"):
            (noweights / name).write_bytes((Path(tiny_model_dir) / name).read_bytes())
    f["noweights"] = str(noweights)
    (d / "afile").write_text("x")
    f["afile"] = str(d / "afile")
    f["good_png"] = str(good_png)
    f["dir"] = str(d)
    return f


def S(*a):  # an sft command
    return ["sft", *a]


# (id, argv builder, extra env, regex that the one-line message must match)
CASES = [
    ("lora_rank", lambda f: S("--lora_rank", "0"), {}, r"--lora_rank must be at least 1"),
    ("batch_size0", lambda f: S("--batch_size", "0"), {}, r"--batch_size"),
    ("batch_size_text", lambda f: S("--batch_size", "abc"), {}, r"--batch_size.*invalid int"),
    ("neg_lr", lambda f: S("--learning_rate", "-1"), {}, r"--learning_rate must be positive"),
    ("dropout", lambda f: S("--lora_dropout", "1.5"), {}, r"--lora_dropout"),
    ("test_ratio", lambda f: S("--dataset_test_ratio", "1.5"), {}, r"--dataset_test_ratio"),
    ("max_length", lambda f: S("--max_length", "5"), {}, r"--max_length"),
    ("epochs0", lambda f: S("--num_train_epochs", "0"), {}, r"--num_train_epochs"),
    ("eval_steps0", lambda f: S("--eval_steps", "0"), {}, r"--eval_steps"),
    ("lr_decay_no_max_time", lambda f: S("--lr_decay_seconds", "60"), {}, r"--lr_decay_seconds .* goes with --max_time"),
    ("save_steps0", lambda f: S("--save_steps", "0"), {}, r"--save_steps"),
    ("grad_acc0", lambda f: S("--gradient_accumulation_steps", "0"), {}, r"--gradient_accumulation_steps"),
    ("warmup", lambda f: S("--warmup_ratio", "2"), {}, r"--warmup_ratio"),
    ("max_pixels_small", lambda f: S("--max_pixels", "10"), {}, r"--max_pixels"),
    ("min_gt_max", lambda f: S("--min_pixels", "99999", "--max_pixels", "5000"), {}, r"--min_pixels"),
    ("grad_norm0", lambda f: S("--max_grad_norm", "0"), {}, r"--max_grad_norm"),
    ("ds_and_fsdp", lambda f: S("--deepspeed", "zero2", "--fsdp", "full_shard"), {}, r"--deepspeed and --fsdp"),
    ("compile_and_ds", lambda f: S("--deepspeed", "zero3", "--torch_compile", "true"), {}, r"--torch_compile runs on one GPU"),
    ("train_type", lambda f: S("--train_type", "adalora"), {}, r"--train_type.*invalid choice"),
    ("bool_value", lambda f: S("--freeze_vit", "maybe"), {}, r"--freeze_vit.*true or false"),
    ("unknown_flag", lambda f: S("--lora_rnak", "8"), {}, r"unrecognized arguments: --lora_rnak"),
    ("strategy", lambda f: S("--check_dataset_strategy", "skip"), {}, r"--check_dataset_strategy.*invalid choice"),
    ("dtype", lambda f: S("--dtype", "float8"), {}, r"--dtype.*invalid choice"),
    ("scheduler", lambda f: S("--lr_scheduler_type", "foo"), {}, r"--lr_scheduler_type.*invalid choice"),
    ("unknown_command", lambda f: ["trian"], {}, r"unknown command 'trian'"),
    ("env_max_steps", lambda f: S(), {"MAX_STEPS": "abc"}, r"MAX_STEPS='abc'"),
    ("env_max_pixels", lambda f: S(), {"MAX_PIXELS": "1e9x"}, r"MAX_PIXELS"),
    ("env_nproc", lambda f: S("--max_steps", "1"), {"NPROC_PER_NODE": "x"}, r"NPROC_PER_NODE='x'"),
    ("model_type", lambda f: S("--model_type", "qwen9-vl"), {}, r"unknown model_type 'qwen9-vl'"),
    ("model_name", lambda f: S("--model", "qwen9-vl-7b"), {}, r"unknown model_type 'qwen9-vl-7b'"),
    ("model_missing_dir", lambda f: S("--model", "./no/such/model"), {}, r"model folder not found"),
    ("model_no_config", lambda f: S("--model", f["noconfig"]), {}, r"has no config.json"),
    ("model_bad_config", lambda f: S("--model", f["badconfig"]), {}, r"config.json is not valid JSON"),
    ("model_bert", lambda f: S("--model", f["bert"]), {}, r"'bert' model"),
    ("model_no_weights", lambda f: S("--model", f["noweights"], "--dataset", f["good"]), {}, r"could not load model weights"),
    ("model_hub_offline", lambda f: S("--model", "someorg/some-vl-model"), {"HF_HUB_OFFLINE": "1"}, r"could not download model 'someorg/some-vl-model'"),
    ("modelscope_missing", lambda f: S("--model", "Qwen/Qwen2-VL-2B-Instruct", "--use_hf", "false"), {}, r"modelscope"),
    ("dataset_name", lambda f: S("--dataset", "latex-ocr-nope"), {}, r"unknown dataset 'latex-ocr-nope'"),
    ("dataset_missing", lambda f: S("--dataset", "./missing.jsonl"), {}, r"dataset file not found"),
    ("dataset_txt", lambda f: S("--dataset", f["txt"]), {}, r"unsupported dataset file type '.txt'"),
    ("dataset_columns", lambda f: S("--dataset", f["bad_columns"]), {}, r"columns \['answer', 'question'\]"),
    ("dataset_malformed", lambda f: S("--dataset", f["malformed"]), {}, r"could not read dataset file"),
    ("dataset_emptydir", lambda f: S("--dataset", f["emptydir"]), {}, r"holds no data files"),
    ("dataset_count", lambda f: S("--dataset", "latex-ocr-sample#abc"), {}, r"bad row count"),
    ("val_missing", lambda f: S("--val_dataset", "./missing_val.jsonl"), {}, r"dataset file not found"),
    ("img_missing", lambda f: S("--dataset", f["missing_img"], "--check_dataset_strategy", "error"), {}, r"row 0 of .*not found"),
    ("img_notimage", lambda f: S("--dataset", f["notimage"], "--check_dataset_strategy", "error"), {}, r"row 0 .*not a readable image"),
    ("img_truncated", lambda f: S("--dataset", f["truncated"], "--check_dataset_strategy", "error"), {}, r"row 0 .*not a readable image"),
    ("img_bomb", lambda f: S("--dataset", f["bomb"], "--check_dataset_strategy", "error"), {}, r"row 0 .*(pixels|too large)"),
    ("img_wide", lambda f: S("--dataset", f["wide"], "--check_dataset_strategy", "error"), {},
     r"row 0 .*300000x1, an aspect ratio over the 200:1"),
    ("img_empty", lambda f: S("--dataset", f["emptyimg"], "--check_dataset_strategy", "error"), {}, r"row 0 .*empty"),
    ("img_dir", lambda f: S("--dataset", f["dirimg"], "--check_dataset_strategy", "error"), {}, r"row 0 .*folder"),
    ("resp_empty", lambda f: S("--dataset", f["empty_resp"], "--check_dataset_strategy", "error"), {}, r"row 0 .*empty response"),
    ("resp_number", lambda f: S("--dataset", f["num_resp"], "--check_dataset_strategy", "error"), {}, r"row 0 .*not a string"),
    ("bad_role", lambda f: S("--dataset", f["bad_role"], "--check_dataset_strategy", "error"), {}, r"unknown role 'robot'"),
    ("too_many_tags", lambda f: S("--dataset", f["too_many_tags"], "--check_dataset_strategy", "error"), {}, r"2 <image> tags but 1 images"),
    ("all_rows_bad", lambda f: S("--dataset", f["all_bad"], "--check_dataset_strategy", "discard"), {}, r"no usable rows left"),
    ("resume_missing", lambda f: S("--resume_from_checkpoint", "/nonexistent/ckpt"), {}, r"not a checkpoint folder"),
    ("resume_last_none", lambda f: S("--resume_from_checkpoint", "last", "--output_dir", f["dir"] + "/empty_out"), {}, r"no checkpoint to resume from"),
    ("output_not_writable", lambda f: S("--dataset", f["good"], "--output_dir", f["afile"] + "/out"), {}, r"not writable"),
    ("plot_missing", lambda f: ["plot", "/nonexistent/run"], {}, r"run folder /nonexistent/run does not exist"),
]


def check(name, out, pattern):
    import re
    errors = [l for l in out["stderr"].splitlines() if l.startswith("error: ")]
    if out["returncode"] == 2 and "Traceback" not in out["stderr"] and len(errors) == 1 and re.search(pattern, errors[0]):
        return None
    return f"{name}: rc={out['returncode']} errors={errors} stderr tail={out['stderr'][-400:]!r}"


# these go through `python -m ocrtune` itself; the rest through tests/cli_forks.py (the same entry point in
# forked processes: one import of torch for all of them, ~2 minutes less on 2 cores). model_hub_offline needs its own
# process: huggingface_hub reads HF_HUB_OFFLINE once, when imported (in the forks' parent, without it)
REAL_PROCESS = ("unknown_flag", "dataset_columns", "img_missing", "model_hub_offline")


def test_bad_inputs_table(files, tmp_path):
    assert len(CASES) >= 50
    base_env = {k: v for k, v in os.environ.items() if k not in ("MAX_STEPS", "MAX_PIXELS", "NPROC_PER_NODE")}
    forked = [c for c in CASES if c[0] not in REAL_PROCESS]
    (tmp_path / "cases.json").write_text(json.dumps([{"argv": argv(files), "env": {**base_env, **env}, "cwd": files["dir"]}
                                                     for _, argv, env, _ in forked]))
    run = subprocess.run([sys.executable, str(Path(__file__).parent / "cli_forks.py"), str(tmp_path / "cases.json"),
                          str(tmp_path / "results.json"), "2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    failures = [check(c[0], out, c[3]) for c, out in zip(forked, results)]
    for name, argv, env, pattern in (c for c in CASES if c[0] in REAL_PROCESS):
        out = subprocess.run([sys.executable, "-m", "ocrtune", *argv(files)], capture_output=True, text=True,
                             env={**base_env, **env}, timeout=300, cwd=files["dir"])
        failures.append(check(name, {"returncode": out.returncode, "stderr": out.stderr}, pattern))
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir):
    import faults
    out = subprocess.run(faults.command("sft", "--model", "tiny", "--dataset", "latex-ocr-sample#16", "--max_steps", "8",
                                        "--save_steps", "2", "--eval_steps", "100", "--output_dir", str(tmp_path),
                                        nan_at_step=5),
                         capture_output=True, text=True, timeout=300)
    errors = [l for l in out.stderr.splitlines() if l.startswith("error: ")]
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(errors) == 1 and "loss became NaN at step 5" in errors[0] and "checkpoint-4" in errors[0]
    run = next((tmp_path / "tiny").glob("v0-*"))
    assert (run / "checkpoint-4" / "adapter_model.safetensors").exists() and not (run / "checkpoint-6").exists()


def test_disk_full_during_save_is_one_line_and_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    from ocrtune.errors import UserError
    from ocrtune import checkpoint as ck

    class Model:
        def __init__(self, fail):
            self.fail = fail

        def save_pretrained(self, path, safe_serialization=True):
            if self.fail:
                raise OSError(errno.ENOSPC, "No space left on device")
            (Path(path) / "adapter_model.safetensors").write_bytes(b"x")

    class State:
        def state_dict(self):
            return {"x": 1}

    ck.save_checkpoint(tmp_path, 2, Model(False), State(), State(), {"global_step": 2})
    with pytest.raises(UserError, match="disk full while saving checkpoint-4.*previous checkpoint is intact"):
        ck.save_checkpoint(tmp_path, 4, Model(True), State(), State(), {"global_step": 4})
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_cuda_out_of_memory_names_the_flags_to_lower(capsys):
    import torch
    from ocrtune.cli.main import _report_unexpected
    assert _report_unexpected(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA out of memory" in err[0] and "--batch_size" in err[0] and "--lean_mlp true" in err[0]
