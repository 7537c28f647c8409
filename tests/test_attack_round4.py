"""Hostile inputs to the commands added last: `ocrtune rlhf` (rewards, plugins, --ckpt_dir, rows that never
encode), the cdm metric's TeX (formulas that try to leave their page, formulas too big to match) and the
reader's packer and restore (weight files, links, concurrent restores). Each test is one class of failure."""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from ocrtune.errors import UserError
from ocrtune.rl import rewards as rw


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_line(capsys, argv) -> str:
    from ocrtune.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2, err
    return err[-1]


# ---------------------------------------------------------------- rlhf: rewards
PLUGIN = '''
import sys
def mapping(completions, solutions, **kw): return {i: 1.0 for i in range(len(completions))}
def text_numbers(completions, solutions, **kw): return ["1.5"] * len(completions)
def endless(completions, solutions, **kw):
    while True:
        yield 1.0
def huge_int(completions, solutions, **kw): return [10 ** 400] * len(completions)
def exits(completions, solutions, **kw): sys.exit(3)
def nan_second(completions, solutions, **kw): return [0.5, float("nan")]
def fine(completions, solutions, **kw):
    import numpy
    return numpy.array([0.25, 1.0])
'''


@pytest.mark.parametrize("name, message", [
    ("mapping", "reward mapping returned dict {0: 1.0, 1: 1.0}, not a list of numbers; return one float per completion"),
    ("text_numbers", "reward text_numbers returned str 1.5 among its values, not a list of numbers; return one float "
                     "per completion"),
    ("endless", "reward endless returned more than 2 values for 2 completions; return one float per completion, in order"),
    ("huge_int", "reward huge_int returned 1000000000000000000000000000000000000000..., too large for a float; "
                 "return finite floats"),
    ("exits", "reward exits failed: SystemExit: 3; fix the reward function"),
    ("nan_second", "reward nan_second returned nan for completion 1, not a finite number; return finite floats"),
])
def test_reward_values_are_numbers_read_with_a_bound(tmp_path, name, message):
    """A plugin's values: a sequence of real numbers, no more of them read than the completions (a generator
    may never end); anything else, sys.exit included, is one line naming the reward."""
    (tmp_path / "plug.py").write_text(PLUGIN)
    table = rw.load_plugins([str(tmp_path / "plug.py")])
    assert rw.score([rw.Reward("fine", table["fine"], 1.0)], ["a", "b"], ["a", "b"]) == [[0.25, 1.0]]
    with pytest.raises(UserError) as e:
        rw.score([rw.Reward(name, table[name], 1.0)], ["a", "b"], ["a", "b"])
    assert str(e.value) == message


def test_plugin_file_is_read_with_a_bound(tmp_path):
    """A path that is no source file (a huge one, a FIFO, a folder) is refused before a byte is read."""
    huge = tmp_path / "huge.py"
    with open(huge, "wb") as f:
        f.truncate(rw.MAX_PLUGIN_BYTES + 1)  # sparse: no disk used
    with pytest.raises(UserError, match=rf"^--external_plugins {huge} is 16,777,217 bytes, over the 16,777,216 a reward "
                                        r"plugin may have; pass the \.py file"):
        rw.load_plugins([str(huge)])
    os.mkfifo(tmp_path / "fifo.py")
    (tmp_path / "dir.py").mkdir()
    for p in ("fifo.py", "dir.py"):
        with pytest.raises(UserError, match=r"is not a Python file; pass the path of a \.py file$"):
            rw.load_plugins([str(tmp_path / p)])


def test_reward_weights_must_be_finite(tmp_path, capsys):
    """A NaN or infinite weight made every advantage NaN: a run folder was made and the loss failed at step 1."""
    for w in ("nan", "inf"):
        line = cli_line(capsys, ["rlhf", "--reward_funcs", "exact", "--reward_weights", w, "--output_dir",
                                 str(tmp_path / "out")])
        assert line == (f"error: --reward_weights [{float(w)}] holds a value that is not a finite number (every "
                        "advantage would be NaN); see `ocrtune rlhf --help`")
    assert not (tmp_path / "out").exists()


def fake_lora_checkpoint(folder: Path) -> Path:
    from safetensors.torch import save_file
    import torch
    ckpt = folder / "checkpoint-1"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_config.json").write_text("{}")
    save_file({"w": torch.zeros(1)}, str(ckpt / "adapter_model.safetensors"))
    return ckpt


def test_output_dir_inside_ckpt_dir_is_refused(tmp_path, capsys):
    """A LoRA --ckpt_dir is not the run's --model (its base is), so check_output_dir did not cover it: the run
    wrote its folders into the user's checkpoint."""
    ckpt = fake_lora_checkpoint(tmp_path / "sft")
    before = tree(tmp_path / "sft")
    for out in (ckpt, ckpt / "out"):
        line = cli_line(capsys, ["rlhf", "--ckpt_dir", str(ckpt), "--output_dir", str(out)])
        how = "is --ckpt_dir" if out == ckpt else "lies inside --ckpt_dir"
        where = f" {ckpt} itself" if out == ckpt else f" {ckpt}"
        assert line == (f"error: --output_dir {out} {how}{where}, which this command reads; writing there would "
                        "destroy it; choose another --output_dir")
    assert tree(tmp_path / "sft") == before and not (ckpt / "out").exists()


def test_rows_that_never_encode_end_in_one_line(tmp_path, tiny_model_dir):
    """Every prompt over --max_length: the step loop skipped them for ever (and heard no SIGTERM, which is only
    read between steps). Now one epoch of empty steps is one line, and each row is warned about once."""
    from ocrtune.rl.args import RlhfArgs
    from ocrtune.rl.grpo import GrpoRun
    from ocrtune.train.data import rows_data
    rows = [{"messages": [{"role": "user", "content": "x " * 40}, {"role": "assistant", "content": "x"}],
             "images": []}] * 4
    args = RlhfArgs(model=str(tiny_model_dir), batch_size=4, num_generations=2, max_completion_length=2,
                    max_length=16, report_to=["none"], output_dir=str(tmp_path / "out"), reward_funcs=["exact"],
                    max_steps=3, beta=0.0, gradient_checkpointing=False)
    run = GrpoRun(args, data=rows_data(rows))
    t = time.monotonic()
    with pytest.raises(UserError, match=r"^no training row fits: every --dataset row is over --max_length 16 or has "
                                        r"an image that can't be read; raise --max_length"):
        run.train()
    assert time.monotonic() - t < 30
    assert run._skipped == {0, 1, 2, 3} and run.state["global_step"] == 0
    assert not list((tmp_path / "out").rglob("checkpoint-*"))


# ---------------------------------------------------------------- cdm: TeX that leaves its page, matching bounds
@pytest.mark.parametrize("formula, why", [
    (r"x^^5cinput{/etc/passwd}", "TeX's ^^ character notation"),
    (r"^^5cglobal^^5ccatcode`y=13 y", "TeX's ^^ character notation"),
    (r"\font\x=/dev/zero \x a", "forbidden command \\font"),
    (r"\message{@@OCRT END}x", "forbidden command \\message"),
    (r"\typeout{@@OCRT 3}x", "forbidden command \\typeout"),
    (r"\showthe\count0", "forbidden command \\showthe"),
    (r"\scantokens{x}", "forbidden command \\scantokens"),
    ("x+" * 9000, "over 16384 characters"),
    (r"\InputIfFileExists{f.tex}{}{}x", "forbidden command \\InputIfFileExists"),
    (r"\fontdimen22\textfont2=30pt x", "forbidden command \\fontdimen"),
    (r"\aftergroup\relax x", "forbidden command \\aftergroup"),
    (r"\ocrtunemark{END}x", "forbidden command \\ocrtunemark"),
])
def test_precheck_closes_the_ways_around_it(formula, why):
    """^^5c is TeX's backslash: every forbidden command could be spelled past the check; \\font reads any file
    (a FIFO blocks until the timeout); a terminal write could forge the marks that attribute errors to
    formulas; an unbounded formula costs unbounded matching."""
    from ocrtune.evaluate.typeset import precheck
    assert precheck(formula) == why
    assert precheck(r"\shoveleft x + \mathrm{font} \fontsize \stackrel{a}{b}") == ""  # names that only start alike


def _ink(keys, centres):
    from ocrtune.evaluate.cdm import Ink
    c = np.asarray(centres, dtype=float)
    boxes = np.concatenate([c - 2, c + 2], axis=1)
    boxes -= boxes[:, :2].min(0).tolist() * 2
    return Ink(list(keys), boxes, (float(boxes[:, 2].max()), float(boxes[:, 3].max())))


def test_many_copies_of_one_glyph_match_in_bounded_memory_and_time(monkeypatch):
    """A formula of thousands of one glyph (a matrix of ones) built an n x m x 4 cost array per character (4,800
    ones against 4,800: 1.4 GB, and 12 rows of 800: several GB) and ran the Hungarian loop over it; past
    MAX_ASSIGN pairs they are paired greedily, one cost row at a time, and score as the exact method does."""
    from ocrtune.evaluate import cdm
    grid = [(x * 6.0, y * 12.0) for y in range(40) for x in range(100)]
    big = _ink(["1"] * len(grid), grid)
    t = time.monotonic()
    assert cdm.match_f1(big, big) == 1.0
    cut = _ink(["1"] * 3000, grid[:3000])  # a prediction missing the last rows
    assert 0.6 < cdm.match_f1(cut, big) <= 2 * 3000 / 7000
    assert time.monotonic() - t < 10
    grid = [(x * 6.0, y * 12.0) for y in range(20) for x in range(20)]  # 400 x 300 pairs: under MAX_ASSIGN
    cases = [(_ink(["1"] * 300, grid[:300]), _ink(["1"] * 400, grid)),
             (_ink("1111x11", [(i * 6.0, 0.0) for i in range(7)]), _ink("11x1111", [(i * 6.0, 0.0) for i in range(7)]))]
    exact = [cdm.match_f1(pred, ref) for pred, ref in cases]
    monkeypatch.setattr(cdm, "MAX_ASSIGN", 0)  # every group greedy: the same scores
    assert [cdm.match_f1(pred, ref) for pred, ref in cases] == exact


# ---------------------------------------------------------------- the reader: packer and restore
def packer():
    import importlib.util
    script = Path(__file__).resolve().parents[1] / "scripts" / "package_reader.py"
    spec = importlib.util.spec_from_file_location("package_reader_attack", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_packer_reads_weight_files_with_a_bound(tiny_model_dir, tmp_path, capsys):
    """Weights are checked before a byte is read: more than --max_mb can hold in 8 bits (a 10 GB model was read
    whole, then refused), an index that names a FIFO (the reader blocked) or a file outside the folder."""
    main = packer()
    assert main(["--model", str(tiny_model_dir), "--output", str(tmp_path / "p"), "--max_mb", "0.1"]) == 2
    mb = (tiny_model_dir / "model.safetensors").stat().st_size / 1e6
    assert capsys.readouterr().err == (f"error: --model {tiny_model_dir} holds {mb:.1f} MB of weights, more than a package "
                                       "of --max_mb 0.1 can hold in 8 bits; package a smaller model, or raise --max_mb\n")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    os.remove(model / "model.safetensors")
    os.mkfifo(model / "a.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    assert main(["--model", str(model), "--output", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err == (f"error: could not read weights {model / 'a.safetensors'}: weight file "
                                       f"{model / 'a.safetensors'} is a FIFO, not a regular file; export or save the "
                                       "model folder again\n")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../x.safetensors"}}))
    assert main(["--model", str(model), "--output", str(tmp_path / "p")]) == 2
    assert "outside the model folder" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.fixture(scope="module")
def package(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reader4") / "pkg"
    assert packer()(["--model", str(tiny_model_dir), "--output", str(out)]) == 0
    return out


def test_package_links_out_and_swapped_sizes_are_refused(package, tmp_path, monkeypatch):
    """A package file that links outside the package (with the manifest's hash: whoever wrote the manifest chose
    the target) is refused; a file of another size than the manifest's is refused before it is hashed."""
    from ocrtune.models import reader
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    outside = tmp_path / "outside.json"
    shutil.move(bad / "config.json", outside)
    (bad / "config.json").symlink_to(outside)
    monkeypatch.setenv(reader.ENV, str(bad))
    with pytest.raises(UserError, match=rf"^reader package file {bad / 'config.json'} is a link to a file outside {bad}; "):
        reader.restore_reader(cache=tmp_path / "c")
    (bad / "config.json").unlink()
    with open(bad / "config.json", "wb") as f:
        f.truncate(10**10)  # sparse: its 10 GB are never hashed
    t = time.monotonic()
    with pytest.raises(UserError, match=r"is missing, unreadable or not the manifest's \(UnsafeFile: its size 10000000000 "
                                        r"is not the manifest's\)"):
        reader.restore_reader(cache=tmp_path / "c")
    assert time.monotonic() - t < 5
    assert not (tmp_path / "c" / "models").exists() or not any((tmp_path / "c" / "models").iterdir())


def test_restore_that_loses_the_rename_race_keeps_the_winner(package, tmp_path, monkeypatch):
    """Two processes restoring at once: the one whose rename finds the other's folder in place (ENOTEMPTY)
    returns that folder instead of failing, and leaves no temp folder."""
    from ocrtune.models import reader
    monkeypatch.setenv(reader.ENV, str(package))

    def other_process_won(tmp, final):
        shutil.copytree(tmp, final)
        raise OSError(errno.ENOTEMPTY, "Directory not empty")
    monkeypatch.setattr(reader, "replace_dir", other_process_won)
    final = reader.restore_reader(cache=tmp_path / "c")
    assert reader._restored(final)
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..", "sub/../../x"])
def test_manifest_names_outside_the_package_are_refused(package, tmp_path, monkeypatch, name):
    """OCRTUNE_READER_DIR is the user's to point anywhere: a manifest naming a path outside its folder is refused
    before anything is read or copied into the cache."""
    from ocrtune.models import reader
    bad = tmp_path / "bad"
    shutil.copytree(package, bad)
    manifest = json.loads((bad / reader.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": "0" * 64, "bytes": 1}
    (bad / reader.MANIFEST).write_text(json.dumps(manifest))
    monkeypatch.setenv(reader.ENV, str(bad))
    with pytest.raises(UserError, match=r"names a file outside its folder"):
        reader.restore_reader(cache=tmp_path / "c")
    assert not (tmp_path / "c" / "models").exists() or not any((tmp_path / "c" / "models").iterdir())


def test_packer_output_that_is_not_a_folder(tiny_model_dir, tmp_path, capsys):
    os.mkfifo(tmp_path / "fifo")
    assert packer()(["--model", str(tiny_model_dir), "--output", str(tmp_path / "fifo")]) == 2
    assert capsys.readouterr().err == f"error: --output {tmp_path / 'fifo'} exists and is not a folder; choose a new folder\n"


def test_speed_max_never_packs_rlhf():
    """rlhf refuses --packing, but --speed max turned it on after that check: GRPO then ran on packed rows, each
    completion's advantage weighing every completion's tokens (no error, a wrong loss)."""
    import torch

    from ocrtune.rl.args import RlhfArgs
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import speed_max
    changes, skipped = speed_max(RlhfArgs(speed="max"), torch.device("cpu"))
    assert "packing" not in changes and "packing_tokens" not in changes
    assert "--packing (rlhf pads each completion to its own row)" in skipped
    assert speed_max(SftArgs(speed="max"), torch.device("cpu"))[0]["packing"] is True  # sft still packs


def test_rewards_that_overflow_float32_are_one_line(tmp_path, tiny_model_dir):
    """Finite float64 rewards (1e39) are infinite in the float32 advantages: the loss went NaN and the run said
    'lower --learning_rate'. Now the step names the rewards."""
    from ocrtune.rl.args import RlhfArgs
    from ocrtune.rl.grpo import GrpoRun
    from ocrtune.train.data import rows_data
    (tmp_path / "plug.py").write_text("def big(completions, solutions, **kw):\n    return [1e39] * len(completions)\n")
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}], "images": []}] * 2
    args = RlhfArgs(model=str(tiny_model_dir), batch_size=2, num_generations=2, max_completion_length=2,
                    report_to=["none"], output_dir=str(tmp_path / "out"), reward_funcs=["big"],
                    external_plugins=[str(tmp_path / "plug.py")], max_steps=1, beta=0.0, gradient_checkpointing=False)
    run = GrpoRun(args, data=rows_data(rows))
    with pytest.raises(UserError, match=r"^the weighted rewards overflow float32 \(largest \|value\| 1e\+39\); scale the "
                                        r"rewards"):
        run.train()
    assert run.state["global_step"] == 0


def test_output_dir_that_is_the_dataset_names_it_once(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]}\n')
    line = cli_line(capsys, ["rlhf", "--dataset", str(data), "--output_dir", str(data)])
    assert line == (f"error: --output_dir {data} is --dataset {data} itself, which this command reads; writing there "
                    "would destroy it; choose another --output_dir")
    assert data.read_text().count("\n") == 1


def test_tex_rewards_without_pdflatex_fail_before_the_run(tmp_path, capsys, monkeypatch):
    """--reward_funcs cdm/format without pdflatex failed at the first step, after the model loaded and the run
    folder was made; now it is the first thing said."""
    from ocrtune.evaluate import cdm
    monkeypatch.setattr(cdm, "_TEX", {})
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("OCRTUNE_TEX_ROOT", raising=False)
    line = cli_line(capsys, ["rlhf", "--reward_funcs", "format", "--output_dir", str(tmp_path / "out")])
    assert line.startswith("error: the cdm metric needs LaTeX (pdflatex) and none was found on PATH; install it")
    assert not (tmp_path / "out").exists()


def test_completion_length_past_the_model_positions(tmp_path, capsys, tiny_model_dir):
    """infer refuses --max_new_tokens past the model's positions; rlhf sampled that far for nothing."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "x"}]}\n')
    line = cli_line(capsys, ["rlhf", "--model", str(tiny_model_dir), "--dataset", str(data), "--max_completion_length",
                             "40000", "--output_dir", str(tmp_path / "out")])
    assert line == (f"error: --max_completion_length 40000 exceeds the model's 32768 positions ({tiny_model_dir}); use "
                    "--max_completion_length 32768 or less")
    assert not (tmp_path / "out").exists()


def test_cache_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    """OCRTUNE_CACHE (or a folder above it) a file: 'unexpected NotADirectoryError ... report it' at the first
    write (a preset's build, the reader's restore)."""
    (tmp_path / "file").write_text("mine")
    for cache in (tmp_path / "file", tmp_path / "file" / "sub"):
        monkeypatch.setenv("OCRTUNE_CACHE", str(cache))
        line = cli_line(capsys, ["infer", "--model", "tiny", "--image", str(tmp_path / "none.png")])
        assert line == (f"error: the ocrtune cache {cache} can't be made: {tmp_path / 'file'} is not a folder; set "
                        "OCRTUNE_CACHE to a folder you can write (or unset it for ~/.cache/ocrtune)")
    assert (tmp_path / "file").read_text() == "mine"
    # a place where no folder can be made (here /proc): one line before any work, not an unexpected FileNotFoundError
    monkeypatch.setenv("OCRTUNE_CACHE", "/proc/ocrtune-cache")
    line = cli_line(capsys, ["infer", "--image", str(tmp_path / "none.png")])
    assert line.startswith("error: the ocrtune cache /proc/ocrtune-cache can't be made (")
    assert line.endswith("; set OCRTUNE_CACHE to a folder you can write (or unset it for ~/.cache/ocrtune)")
