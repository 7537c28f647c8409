"""No command destroys what it was given or what a run made: export only replaces its own earlier output, no
command writes over its inputs, a killed infer/eval continues its result file, a resume over changed data or
an adapter of another shape stops with one line, a full disk while saving leaves the previous checkpoint."""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from ocrtune.data.registry import OCR_PROMPT
from ocrtune.errors import UserError
from samples import sample_rows, write_png


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A local jsonl dataset of 8 rows (PNG files beside it)."""
    d = tmp_path_factory.mktemp("data")
    lines = []
    for i, row in enumerate(sample_rows(8)):
        png = write_png(row, d / f"img{i}.png")
        lines.append({"query": "<image>" + OCR_PROMPT, "response": row["messages"][1]["content"], "images": [str(png)]})
    path = d / "rows.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, data, tmp_path_factory) -> Path:
    """A 4-step LoRA run over `data` with checkpoint-2 and checkpoint-4."""
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import run_sft
    out = tmp_path_factory.mktemp("run")
    res = run_sft(SftArgs(model=str(tiny_model_dir), dataset=[str(data)], dataset_test_ratio=0.0, max_steps=4,
                          save_steps=2, eval_steps=100, batch_size=2, output_dir=str(out), report_to=["none"]))
    return Path(res["run_dir"])


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("*-merged"))
    return dest


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *argv) -> tuple[int, str]:
    from ocrtune.cli.main import main
    with pytest.raises(SystemExit) as e:
        main([*map(str, argv)])
    return e.value.code, capsys.readouterr().err


def one_error(code: int, err: str) -> str:
    """The one `error:` line (the datasets library's progress lines aside), exit status 2."""
    lines = [line for line in err.split("\n") if line and "examples/s" not in line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert "unexpected" not in lines[0]
    return lines[0]


# ---------------------------------------------------------------- export --output_dir / --force

def test_export_force_never_replaces_a_run_a_checkpoint_or_folders_above_runs(run, tmp_path, capsys):
    home = tmp_path / "output"
    a, b = copy_run(run, home / "tiny" / "v0-a"), copy_run(run, home / "tiny" / "v1-b")
    before = snapshot(home)
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    cases = [(a, "contains the checkpoint"), (home, "contains the checkpoint"), (home / "tiny", "contains the checkpoint"),
             (a / "checkpoint-4", "is the checkpoint"), (a / "checkpoint-2", "holds a training run or checkpoint"),
             (a / "checkpoint-2" / "sub", "lies inside the checkpoint or model folder"),
             (b, "holds a training run or checkpoint"), (mine, "is not a merged checkpoint written by ocrtune export")]
    for out, words in cases:
        err = one_error(*cli(capsys, "export", "--ckpt_dir", a / "checkpoint-4", "--output_dir", out, "--force", "true"))
        assert words in err, (out, err)
    assert snapshot(home) == before  # args.json, logging.jsonl, every checkpoint: byte for byte
    assert (mine / "todo.txt").read_text() == "mine"


def test_export_force_replaces_an_earlier_export_or_an_empty_folder(run, tmp_path, capsys):
    ckpt = copy_run(run, tmp_path / "run") / "checkpoint-4"
    out = tmp_path / "m"
    out.mkdir()  # empty: may be written
    assert cli(capsys, "export", "--ckpt_dir", ckpt, "--output_dir", out, "--force", "true")[0] == 0
    inode = (out / "model.safetensors").stat().st_ino
    assert cli(capsys, "export", "--ckpt_dir", ckpt, "--output_dir", out, "--force", "true")[0] == 0
    assert (out / "model.safetensors").stat().st_ino != inode and (out / "ocrtune_merge.json").exists()


def test_checkpoint_deleted_during_export_is_one_error_line(run, tmp_path, capsys, monkeypatch):
    from ocrtune.models import loading
    ckpt = copy_run(run, tmp_path / "run") / "checkpoint-2"
    load = loading.load_model

    def load_then_delete(*a, **kw):  # as a run's --save_total_limit rotation removes it meanwhile
        model = load(*a, **kw)
        shutil.rmtree(ckpt)
        return model
    monkeypatch.setattr(loading, "load_model", load_then_delete)
    err = one_error(*cli(capsys, "export", "--ckpt_dir", ckpt, "--output_dir", tmp_path / "m"))
    assert f"checkpoint {ckpt} was deleted while it was being exported" in err
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------- no command writes over its inputs

def test_infer_and_eval_refuse_a_result_path_that_is_their_dataset(run, data, tmp_path, capsys):
    copy = tmp_path / "d"
    shutil.copytree(data.parent, copy)
    rows = copy / "rows.jsonl"
    (tmp_path / "link.jsonl").symlink_to(rows)
    before = snapshot(copy)
    for cmd, result, words in (("infer", rows, "is the dataset"), ("eval", rows, "is the dataset"),
                               ("infer", tmp_path / "link.jsonl", "is the dataset"),  # a symlink to it
                               ("eval", tmp_path / "rows_summary.jsonl", None),  # only its summary would hit it
                               ("infer", copy / "res.jsonl", "lies inside the dataset")):
        dataset = copy if words == "lies inside the dataset" else rows
        if words is None:  # eval's summary <stem>_summary.json is the dataset
            result, dataset = tmp_path / "r.jsonl", tmp_path / "r_summary.json"
            shutil.copy(rows, dataset)
        err = one_error(*cli(capsys, cmd, "--ckpt_dir", run / "checkpoint-4", "--dataset", dataset,
                             "--result_path", result, "--max_new_tokens", 2))
        assert (words or "is the dataset") in err and "--result_path" in err, err
    assert snapshot(copy) == before


def test_sft_synth_and_plot_refuse_to_write_over_their_inputs(run, data, tiny_model_dir, tmp_path):
    from ocrtune.plot.plots import plot_run
    from ocrtune.synth.run import SynthArgs, run_synth
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    copy = tmp_path / "d"
    shutil.copytree(data.parent, copy)
    before = snapshot(copy)
    for out in (copy, copy / "runs"):
        with pytest.raises(UserError, match="--output_dir .* the dataset|--output_dir .*--dataset"):
            SftRun(SftArgs(model=str(tiny_model_dir), dataset=[str(copy / "rows.jsonl#4"), str(copy)], output_dir=str(out)))
    with pytest.raises(UserError, match="--output_dir .* lies inside --model"):
        SftRun(SftArgs(model=str(tiny_model_dir), dataset=[str(copy)], output_dir=str(tiny_model_dir / "runs")))
    with pytest.raises(UserError, match=f"--output_dir {copy} contains the dataset"):
        run_synth(SynthArgs(dataset=[str(copy / "rows.jsonl")], output_dir=str(copy)))
    assert snapshot(copy) == before
    rd = copy_run(run, tmp_path / "run")
    log = (rd / "logging.jsonl").read_bytes()
    (rd / "images").mkdir(exist_ok=True)
    for p in (rd / "images").iterdir():
        p.unlink()
    (rd / "images" / "train_loss.png").symlink_to(rd / "logging.jsonl")
    with pytest.raises(UserError, match="the plot .* is the log"):
        plot_run(rd)
    assert (rd / "logging.jsonl").read_bytes() == log


# ---------------------------------------------------------------- a killed infer/eval continues

@pytest.fixture(scope="module")
def engine(run):
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.load import load_for_inference
    return load_for_inference(InferArgs(ckpt_dir=str(run / "checkpoint-4")))


def _infer(engine, data, result, **kw):
    """run_dataset over `data`; returns (summary, rows generated by this call)."""
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.dataset import run_dataset
    eng, info = engine
    asked = []
    real = type(eng).iter_answers

    def counting(self, rows, *a, **k):
        asked.append(len(rows))
        return real(self, rows, *a, **k)
    eng.iter_answers = counting.__get__(eng)
    try:
        args = InferArgs(ckpt_dir=info["ckpt_dir"], dataset=[str(data)], result_path=str(result),
                         infer_batch_size=4, **{"max_new_tokens": 4, **kw})
        return run_dataset(eng, info, args, ["bleu", "exact_match"]), sum(asked)
    finally:
        del eng.iter_answers


def test_killed_infer_continues_where_it_stopped(engine, data, tmp_path, capsys):
    full, n = _infer(engine, data, tmp_path / "full.jsonl")
    assert n == 8
    lines = [line + "\n" for line in (tmp_path / "full.jsonl").read_text().split("\n")[:-1]]  # not splitlines: U+2028
    assert len(lines) == 8
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:3]) + lines[3][:25])  # killed while writing row 3
    capsys.readouterr()
    again, n = _infer(engine, data, part)
    assert n == 5  # rows 3..7 only
    assert capsys.readouterr().err.splitlines()[0] == \
        f"continuing {part}: kept 3 of 8 rows already answered, dropped a half-written last line"
    assert part.read_text() == "".join(lines)
    assert {k: again[k] for k in ("bleu4", "exact_match", "count", "rows")} == {k: full[k] for k in ("bleu4", "exact_match", "count", "rows")}
    assert _infer(engine, data, part)[1] == 0  # finished: nothing left to answer
    assert part.read_text() == "".join(lines)


def test_a_result_file_of_other_data_settings_or_no_results_is_refused_untouched(engine, data, tmp_path):
    _infer(engine, data, tmp_path / "r.jsonl")
    saved = (tmp_path / "r.jsonl").read_bytes()
    other = tmp_path / "other.jsonl"
    rows = data.read_text().splitlines()
    other.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same rows in another order
    with pytest.raises(UserError, match=r"already holds other results \(line 1: row 0 was another image or query"):
        _infer(engine, other, tmp_path / "r.jsonl")
    with pytest.raises(UserError, match="line 1: written by another model, checkpoint or generation settings"):
        _infer(engine, data, tmp_path / "r.jsonl", max_new_tokens=6)
    assert (tmp_path / "r.jsonl").read_bytes() == saved
    notes = tmp_path / "notes.jsonl"
    for text in ('{"a": 1}\n', "just text, no newline"):
        notes.write_text(text)
        with pytest.raises(UserError, match=f"--result_path {notes} already"):
            _infer(engine, data, notes)
        assert notes.read_text() == text


# ---------------------------------------------------------------- resuming sft

def test_resume_over_changed_data_is_refused_unless_allowed(run, data, tmp_path):
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    copy = copy_run(run, tmp_path / "out" / "tiny" / run.name)
    saved, st = data.read_bytes(), data.stat()
    args_json = (copy / "args.json").read_bytes()
    try:
        lines = saved.decode().splitlines(keepends=True)
        data.write_text("".join(lines[1:] + lines[:1]))  # same size, same rows, another order
        with pytest.raises(UserError, match=f"dataset {data} changed on disk since the run was saved.*--allow_data_change true"):
            SftRun(SftArgs(resume_from_checkpoint=str(copy / "checkpoint-2")))
        assert (copy / "args.json").read_bytes() == args_json
        SftRun(SftArgs(resume_from_checkpoint=str(copy / "checkpoint-2"), allow_data_change=True))
        SftRun(SftArgs(resume_from_checkpoint=str(copy / "checkpoint-2")))  # the run now records the new data
    finally:
        data.write_bytes(saved)
        os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_resume_with_another_lora_rank_names_the_mismatch(run, data, tmp_path, tiny_model_dir):
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    copy = copy_run(run, tmp_path / "run")
    (copy / "args.json").unlink()  # a run saved without it: the flags given now are used
    with pytest.raises(UserError) as e:
        SftRun(SftArgs(model=str(tiny_model_dir), dataset=[str(data)], dataset_test_ratio=0.0, lora_rank=16,
                       resume_from_checkpoint=str(copy / "checkpoint-2")))
    assert str(e.value).startswith(f"the adapter in {copy / 'checkpoint-2'} does not fit this run's LoRA shape: "
                                   "it has LoRA rank 8 and this run --lora_rank 16")


def test_resume_with_the_identical_command_reports_no_change(run, tmp_path):
    from ocrtune.cli.main import _parser
    from ocrtune.cli.parsing import build
    from ocrtune.train.args import SftArgs
    from ocrtune.train.resume import resume_args
    copy = copy_run(run, tmp_path / "run")
    saved = json.loads((copy / "args.json").read_text())
    argv = ["sft", "--resume_from_checkpoint", str(copy / "checkpoint-2"), "--eval_steps", str(saved["eval_steps"]),
            "--save_steps", str(saved["save_steps"]), "--report_to", "none", "--output_dir", saved["output_dir"],
            "--logging_steps", str(saved["logging_steps"])]
    _, note = resume_args(build(SftArgs, _parser().parse_args(argv)), copy / "checkpoint-2")
    assert "changed" not in note, note
    _, note = resume_args(build(SftArgs, _parser().parse_args(argv + ["--eval_steps", "7"])), copy / "checkpoint-2")
    assert note.endswith("; changed: --eval_steps 7"), note


# ---------------------------------------------------------------- a full disk while saving

def _ensospc(*a, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_full(*a, **kw):
    from safetensors import SafetensorError
    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')


def _torch_full(*a, **kw):  # what torch.save's zip writer raises on a full disk
    raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed")


@pytest.mark.parametrize("where,fail", [("weights", _safetensors_full), ("weights", _ensospc), ("torch", _torch_full),
                                        ("torch", _ensospc)], ids=["safetensors", "weights-oserror", "torch", "torch-oserror"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, fail):
    import torch

    from ocrtune import checkpoint
    layer = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    class Model:
        full = False

        def save_pretrained(self, folder, **kw):
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
            if self.full and where == "weights":
                fail()
    state = {"global_step": 2, "epoch": 0, "micro_batches_done": 2}
    checkpoint.save_checkpoint(tmp_path, 2, Model(), opt, sched, state)
    before = snapshot(tmp_path)
    Model.full = True
    if where == "torch":
        monkeypatch.setattr(checkpoint.torch, "save", fail)
        # torch's writer does not say why a write failed: the free space does
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 4096))
    with pytest.raises(UserError) as e:
        checkpoint.save_checkpoint(tmp_path, 4, Model(), opt, sched, {**state, "global_step": 4})
    assert str(e.value).startswith("disk full while saving checkpoint-4; the previous checkpoint is intact; free disk space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]  # no .checkpoint-4.tmp left
    assert snapshot(tmp_path) == before
