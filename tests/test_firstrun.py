"""A newcomer's first run: a broken torch/torchvision pair, torchrun from the clone's parent folder,
the recipe's smoke command, a hub dataset name offline."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from ocrtune.cli.main import main


def _run(argv, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err.strip().splitlines()


def _torch_minor() -> int:
    return int(torch.__version__.split(".")[1])


@pytest.fixture
def broken_torchvision(tmp_path, monkeypatch):
    """A torchvision whose import fails the way a build for another torch does."""
    pkg = tmp_path / "fake_site" / "torchvision"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.syspath_prepend(str(pkg.parent))


@pytest.mark.parametrize("command", ["infer", "sft"])
def test_a_broken_torchvision_is_one_error_line_saying_what_to_install(broken_torchvision, capsys, command):
    code, err = _run([command], capsys)
    m = _torch_minor()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"error: torchvision does not import with torch {torch.__version__} "
                             "(RuntimeError: operator torchvision::nms does not exist); ")
    assert f'pip install "torch==2.{m}.*" "torchvision==0.{m + 15}.*"' in err[0]


def test_a_torchvision_of_another_release_is_named(monkeypatch, capsys):
    m = _torch_minor()
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(__version__=f"0.{m + 16}.0"))
    code, err = _run(["export"], capsys)
    assert code == 2
    assert err == [f"error: torchvision 0.{m + 16}.0 is built for torch 2.{m + 1}, but torch {torch.__version__} "
                   f"is installed; install torch and torchvision together so pip picks a matching pair: "
                   f'pip install "torch==2.{m}.*" "torchvision==0.{m + 15}.*"'
                   + (" --index-url https://download.pytorch.org/whl/cpu" if "+cpu" in torch.__version__ else "")]


def test_a_cpu_torch_with_a_cuda_torchvision_is_named():
    from ocrtune.compat import pair_problem
    assert pair_problem("2.13.0+cpu", "0.28.0+cu130") == ("torchvision 0.28.0+cu130 and torch 2.13.0+cpu are "
                                                          "builds for different devices (CPU and CUDA)")
    assert pair_problem("2.14.1+cu130", "0.29.1+cu130") is None
    assert pair_problem("2.14.1", "0.29.1") is None


def test_an_absent_torchvision_is_left_to_transformers(monkeypatch):
    from ocrtune.compat import check_torch_stack
    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` -> ModuleNotFoundError
    assert check_torch_stack() is None


def test_transformers_hidden_import_error_names_the_packages(broken_torchvision, monkeypatch, capsys):
    """Where the failure shows first inside transformers' lazy import, the line still names the pair."""
    import ocrtune.cli.main as cli

    def hidden(argv):
        raise ModuleNotFoundError("Could not import module 'Qwen2VLForConditionalGeneration'. Are this "
                                  "object's requirements defined correctly?")
    monkeypatch.setattr(cli, "run", hidden)
    code, err = _run(["list"], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: torchvision does not import with torch ")
    assert "unexpected" not in err[0]


# ---------------------------------------------------------------- torchrun's ranks import the launcher's ocrtune

@pytest.mark.parametrize("shadow", ["clone", "package"])
def test_ranks_import_the_launchers_ocrtune_from_a_folder_that_shadows_it(tmp_path, shadow):
    """torchrun runs each rank as `python -m ocrtune` in the launcher's folder; from the folder that holds a
    clone (a namespace `ocrtune/`) or another copy, that folder came first on sys.path."""
    import os
    import subprocess
    from pathlib import Path

    import ocrtune
    from ocrtune.train.launch import rank_env
    folder = tmp_path / "ocrtune"
    folder.mkdir()
    (folder / "README.md").write_text("a clone's root\n")
    if shadow == "package":
        (folder / "__init__.py").write_text("")
        (folder / "__main__.py").write_text("print('the shadowing copy')\n")
    env = rank_env({**os.environ, "PYTHONPATH": str(tmp_path)})
    root = str(Path(ocrtune.__file__).resolve().parent.parent)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == root and env["PYTHONSAFEPATH"] == "1"
    done = subprocess.run([sys.executable, "-m", "ocrtune", "--version"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, f"ocrtune {ocrtune.__version__}"), done.stderr


# ---------------------------------------------------------------- the suite leaves the system temp folder alone

def test_the_session_temp_folder_is_inside_pytests(tmp_path_factory):
    """conftest's system_temp_untouched: `tempfile` and subprocesses (TMPDIR) write under pytest's folder."""
    import os
    import tempfile
    from pathlib import Path
    base = tmp_path_factory.getbasetemp().resolve()
    assert Path(tempfile.gettempdir()).resolve().is_relative_to(base)
    assert Path(os.environ["TMPDIR"]).resolve().is_relative_to(base)
    assert Path(tempfile.mkdtemp()).resolve().is_relative_to(base)


# ---------------------------------------------------------------- a hub dataset name without a network

@pytest.fixture
def hub_mode(monkeypatch):
    """Sets the offline mode the libraries read from HF_HUB_OFFLINE at import (they may be imported already)."""
    import datasets
    from huggingface_hub import constants

    def set_offline(value: bool):
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", value)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", value)
    return set_offline


def test_a_hub_dataset_in_offline_mode_fails_at_once(hub_mode, tmp_path, monkeypatch):
    import time

    from ocrtune.data.loading import load_dataset
    from ocrtune.errors import UserError
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    hub_mode(True)
    t = time.time()
    with pytest.raises(UserError) as e:
        load_dataset("someone/no_such_dataset_for_ocrtune")
    assert time.time() - t < 5
    assert str(e.value).startswith("could not load dataset 'someone/no_such_dataset_for_ocrtune' (split train): "
                                   "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set and no copy is cached (")
    assert str(e.value).endswith("; unset it to download, or download it where the network reaches the hub and "
                                 "pass its local path to --dataset")


def test_an_unreachable_hub_fails_at_once_naming_it(hub_mode, tmp_path, monkeypatch):
    """Not in offline mode and no network: one connect to the hub's host, not five retries per request."""
    import time

    from ocrtune.data import hub
    from ocrtune.data.loading import load_dataset
    from ocrtune.errors import UserError
    for name in hub.PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(hub, "endpoint", lambda: "http://127.0.0.1:9")  # the discard port: nothing listens
    hub_mode(False)
    t = time.time()
    with pytest.raises(UserError) as e:
        load_dataset("someone/no_such_dataset_for_ocrtune", split="validation")
    assert time.time() - t < 5
    assert str(e.value) == ("could not load dataset 'someone/no_such_dataset_for_ocrtune' (split validation): the "
                            "Hugging Face hub (127.0.0.1:9: Connection refused) is unreachable and no copy is cached; "
                            "check the network (or HF_ENDPOINT, a proxy), or download it where the network reaches "
                            "the hub and pass its local path to --dataset")


def test_an_installed_ocrtune_puts_no_site_packages_on_the_ranks_pythonpath(monkeypatch):
    """From site-packages, PYTHONSAFEPATH alone keeps the current folder out; site-packages on PYTHONPATH would
    come before the standard library."""
    import ocrtune
    from ocrtune.train.launch import rank_env
    monkeypatch.setattr(ocrtune, "__file__", "/usr/lib/python3/site-packages/ocrtune/__init__.py")
    assert rank_env({"PYTHONPATH": "/mine", "X": "1"}) == {"PYTHONPATH": "/mine", "X": "1", "PYTHONSAFEPATH": "1"}



def test_processes_asking_for_a_preset_at_once_build_it_once(tmp_path, monkeypatch):
    """The ranks of `NPROC_PER_NODE=2 ocrtune sft` on a fresh cache ask for the tiny preset at the same moment:
    one builds it while the other waits on the lock and then takes the finished folder (two builds replaced the
    folder one rank was loading). Two threads stand in for the ranks: flock is per open file, so they contend."""
    import threading
    import time

    from ocrtune.models import presets
    monkeypatch.setenv("OCRTUNE_CACHE", str(tmp_path))
    builds = []

    def slow_build(name, out, *a, **kw):
        builds.append(name)
        time.sleep(0.5)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return out
    monkeypatch.setattr(presets, "build_preset", slow_build)
    got = []
    threads = [threading.Thread(target=lambda: got.append(presets.ensure_preset("tiny"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert builds == ["tiny"] and len(got) == 2 and got[0] == got[1] == presets.preset_path("tiny")
