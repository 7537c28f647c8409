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
