"""The command line: help, the registry listing and SWIFT's command names."""
from __future__ import annotations

import subprocess
import sys


def ocrtune(*args):
    return subprocess.run([sys.executable, "-m", "ocrtune", *args], capture_output=True, text=True, timeout=120)


def test_list_shows_models_and_datasets():
    out = ocrtune("list")
    assert out.returncode == 0
    assert "qwen2-vl-7b-instruct" in out.stdout and "Qwen/Qwen2-VL-7B-Instruct" in out.stdout
    assert "latex-ocr-handwrite" in out.stdout and "synthetic_handwrite" in out.stdout


def test_deploy_is_serve():
    out = ocrtune("deploy", "--help")
    assert out.returncode == 0 and "--allow_image_urls" in out.stdout


def test_every_command_has_help():
    for cmd in ("sft", "infer", "eval", "export", "serve", "plot"):
        out = ocrtune(cmd, "--help")
        assert out.returncode == 0 and "usage: ocrtune" in out.stdout, cmd


def test_version_and_help_show_every_command_and_the_defaults():
    from ocrtune import __version__
    out = ocrtune("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"ocrtune {__version__}"
    out = ocrtune("--help")
    assert out.returncode == 0 and "deploy" in out.stdout and "--version" in out.stdout
    sft = " ".join(ocrtune("sft", "--help").stdout.split())  # argparse wraps lines
    for flag_help in ("LoRA rank (default: 8)", "AdamW weight decay (default: 0.1)", "(default: cosine)",
                      "keep the vision tower frozen (default: true)", "(env MAX_PIXELS)"):
        assert flag_help in sft, flag_help
    plot = " ".join(ocrtune("plot", "--help").stdout.split())
    assert "a run folder written by ocrtune sft" in plot and "smoothing" in plot and "(default: 0.9)" in plot


def test_plot_says_a_missing_folder_does_not_exist(tmp_path):
    out = ocrtune("plot", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and out.stderr.startswith(f"error: run folder {tmp_path / 'nowhere'} does not exist;")
    out = ocrtune("plot", str(tmp_path))
    assert out.returncode == 2 and "has no logging.jsonl" in out.stderr
    out = ocrtune("plot", str(tmp_path), "--smoothing", "1")
    assert out.returncode == 2 and "--smoothing 1.0 is out of range" in out.stderr


def _log_through_ocrtune_setup(code: str, level: str = "WARNING") -> str:
    import os
    from pathlib import Path
    repo = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", "from ocrtune.cli.main import setup_logging; setup_logging()\n" + code],
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": repo, "OCRTUNE_LOG_LEVEL": level})
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_hub_retry_messages_print_once():
    err = _log_through_ocrtune_setup(
        "from huggingface_hub.utils import logging as hl\n"
        "hl.get_logger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')")
    assert err.count("Retrying in 1s [Retry 1/5].") == 1


def test_liger_backend_import_warnings_only_at_debug():
    """A mock of liger-kernel's registry logging what it logs for each backend it can't import."""
    code = ("import logging\n"
            "logging.getLogger('liger_kernel.backends.registry').warning("
            "'Backend impl %s for op %s could not be imported: %s', 'cutile', 'rms_norm', 'ImportError')\n"
            "logging.getLogger('ocrtune').warning('an ocrtune warning')")
    err = _log_through_ocrtune_setup(code)
    assert "could not be imported" not in err and "WARNING an ocrtune warning" in err
    err = _log_through_ocrtune_setup(code, "DEBUG")
    assert "DEBUG Backend impl cutile for op rms_norm could not be imported" in err


def test_cuda_allocator_defaults_to_expandable_segments_unless_the_user_set_it():
    from ocrtune.compat import ALLOCATOR_DEFAULT, ALLOCATOR_VARS, default_cuda_allocator
    env = {}
    assert default_cuda_allocator(env) and env == {"PYTORCH_CUDA_ALLOC_CONF": ALLOCATOR_DEFAULT}
    for name in ALLOCATOR_VARS:
        env = {name: ""}  # an empty value is the way to ask for the plain allocator
        assert not default_cuda_allocator(env) and env == {name: ""}
    # the entry point sets it before torch is imported (torch reads it at the first CUDA allocation)
    code = ("import os, sys\nfrom ocrtune.cli.main import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('PYTORCH_CUDA_ALLOC_CONF'), file=sys.stderr)")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ALLOCATOR_VARS}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.stderr.strip().splitlines()[-1] == ALLOCATOR_DEFAULT, r.stderr
