"""`ocrtune <command>`: sft, rlhf, infer, eval, export, serve, plot, list."""
from __future__ import annotations

import logging
import os
import sys

from ocrtune.compat import check_torch_stack
from ocrtune.errors import UserError

COMMANDS = {
    "sft": "fine-tune (LoRA or full) on a dataset",
    "rlhf": "reinforcement learning from rewards: --rlhf_type grpo (LoRA or full)",
    "infer": "answer queries about images (interactive, one-shot, or over a dataset)",
    "eval": "generate on a dataset and report OCR metrics",
    "export": "merge a LoRA checkpoint into a standalone model folder",
    "serve": "OpenAI-compatible API and a web page for a model",
    "synth": "render LaTeX formulas into LaTeX_OCR-style training rows (parquet shards)",
    "plot": "redraw a run's PNG plots from its logging.jsonl",
    "list": "list registered models and datasets",
    "web-ui": "a local web page to fine-tune, watch, evaluate, merge and try runs",
}
ALIASES = {"deploy": "serve", "webui": "web-ui"}  # SWIFT's name for serving; web-ui's short spelling
MODEL_COMMANDS = ("sft", "rlhf", "infer", "eval", "export", "serve")  # the ones that import transformers' model classes


def _parser():
    from ocrtune.cli.parsing import OneLineParser, add_dataclass_args
    from ocrtune.export.args import ExportArgs
    from ocrtune.infer.args import InferArgs
    from ocrtune.rl.args import RlhfArgs
    from ocrtune.train.args import SftArgs

    from ocrtune import __version__
    parser = OneLineParser(prog="ocrtune", description="Fine-tune Qwen2-VL family models for image-to-text OCR.")
    parser.add_argument("--version", action="version", version=f"ocrtune {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=OneLineParser, metavar="<command>")
    for name, cls in (("sft", SftArgs), ("rlhf", RlhfArgs), ("infer", InferArgs), ("eval", InferArgs), ("export", ExportArgs)):
        p = sub.add_parser(name, help=COMMANDS[name], prog=f"ocrtune {name}")
        add_dataclass_args(p, cls)
    try:
        from ocrtune.serve.args import ServeArgs
        add_dataclass_args(sub.add_parser("serve", help=COMMANDS["serve"] + " (alias: deploy, SWIFT's name)",
                                          prog="ocrtune serve"), ServeArgs)
    except ImportError:
        pass
    from ocrtune.synth.run import SynthArgs
    add_dataclass_args(sub.add_parser("synth", help=COMMANDS["synth"], prog="ocrtune synth"), SynthArgs)
    p = sub.add_parser("plot", help=COMMANDS["plot"], prog="ocrtune plot", description=COMMANDS["plot"] +
                       " into <run_dir>/images/ and print their paths")
    p.add_argument("run_dir", help="a run folder written by ocrtune sft (output/<model>/v<N>-<time>)")
    p.add_argument("--smoothing", type=float, default=0.9,
                   help="TensorBoard-style smoothing of the loss, token_acc and grad_norm curves, 0 (none) to <1; "
                        "lowered on short runs so the curve keeps up (default: 0.9)")
    sub.add_parser("list", help=COMMANDS["list"], prog="ocrtune list")
    from ocrtune.webui.args import WebUiArgs
    add_dataclass_args(sub.add_parser("web-ui", help=COMMANDS["web-ui"] + " (alias: webui)", prog="ocrtune web-ui"),
                       WebUiArgs)
    return parser


def check_sft(argv: list[str]):
    """sft flags parsed and validated exactly as `ocrtune sft` does (the web page's check); UserError if bad."""
    from ocrtune.cli.parsing import build
    from ocrtune.train.args import SftArgs, validate
    args = build(SftArgs, _parser().parse_args(["sft", *argv]))
    validate(args)
    return args


def run(argv: list[str]) -> int:
    from ocrtune.cli.parsing import build
    parser = _parser()
    if not argv:
        parser.print_help()
        return 0
    argv = [ALIASES.get(argv[0], argv[0]), *argv[1:]]
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):  # after aliases
        raise UserError(f"unknown command '{argv[0]}'", f"use one of: {', '.join(COMMANDS)}")
    ns = parser.parse_args(argv)
    cmd = ns.command
    if cmd in MODEL_COMMANDS and cmd not in ("sft", "rlhf"):
        check_torch_stack()
    if cmd == "sft":
        from ocrtune.train.args import SftArgs, validate
        from ocrtune.train.launch import maybe_relaunch
        args = build(SftArgs, ns)
        validate(args)  # before the heavy imports: a bad flag is reported at once
        check_torch_stack()  # before torchrun starts ranks that would each fail the same way
        maybe_relaunch(argv)
        from ocrtune.train.trainer import run_sft
        run_sft(args)
    elif cmd == "rlhf":
        from ocrtune.rl.args import RlhfArgs, validate_rlhf
        from ocrtune.rl.rewards import resolve
        from ocrtune.train.args import validate
        from ocrtune.train.launch import maybe_relaunch
        args = build(RlhfArgs, ns)
        validate(args)
        validate_rlhf(args)
        resolve(args.reward_funcs, args.reward_weights, args.external_plugins, args.tex_root)  # before any work
        check_torch_stack()
        maybe_relaunch(argv)
        from ocrtune.rl.grpo import run_grpo
        run_grpo(args)
    elif cmd in ("infer", "eval"):
        from ocrtune.infer.args import InferArgs
        from ocrtune.infer.cli import run_eval, run_infer
        (run_eval if cmd == "eval" else run_infer)(build(InferArgs, ns))
    elif cmd == "export":
        from ocrtune.export.args import ExportArgs
        from ocrtune.export.merge import run_export
        run_export(build(ExportArgs, ns))
    elif cmd == "serve":
        from ocrtune.serve.args import ServeArgs
        from ocrtune.serve.app import run_serve
        run_serve(build(ServeArgs, ns))
    elif cmd == "synth":
        from ocrtune.synth.run import SynthArgs, run_synth
        run_synth(build(SynthArgs, ns))
    elif cmd == "plot":
        from ocrtune.plot.plots import plot_run
        if not 0 <= ns.smoothing < 1:
            raise UserError(f"--smoothing {ns.smoothing} is out of range", "use a value from 0 (no smoothing) to below 1")
        for path in plot_run(ns.run_dir, ns.smoothing):
            print(path)
    elif cmd == "web-ui":
        from ocrtune.webui.app import run_webui
        from ocrtune.webui.args import WebUiArgs
        run_webui(build(WebUiArgs, ns), check_sft)
    elif cmd == "list":
        from ocrtune.data.registry import DATASETS
        from ocrtune.models.registry import MODELS
        print("models:")
        from ocrtune.models.reader import reader_dir
        for s in MODELS.values():
            if s.preset == "ocrtune-reader":
                where = "bundled" if (reader_dir() / "reader.json").is_file() else "not bundled in this install"
                print(f"  {s.name:28s} (the trained formula reader: {where})")
                continue
            print(f"  {s.name:28s} {s.hf_id or '(built locally: ' + s.preset + ')'}")
        print("datasets:")
        for d in DATASETS.values():
            local = "bundled sample" + (f" ({d.name.rsplit('-', 1)[1]} rows: {' + '.join(str(b - a) for a, b in d.rows.values())})"
                                        if d.rows else "")
            print(f"  {d.name:28s} {d.hf_id or local} {'/'.join(d.subsets) if d.hf_id else ''}")
    return 0


class DemoteKernelNotices(logging.Filter):
    """liger-kernel logs a WARNING for each optional backend it can't import, on every GPU run and rank, and
    bitsandbytes one for its optional CPU kernel package (PEFT imports it on every command where it is
    installed); they concern the libraries' internals, not the run (ocrtune says itself when Liger is off, and
    bitsandbytes falls back to its own kernels): show them only at DEBUG (OCRTUNE_LOG_LEVEL=DEBUG)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("liger_kernel", "bitsandbytes")) and record.levelno < logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def log_level(raw: str | None) -> int:
    """OCRTUNE_LOG_LEVEL: a level name in any case (debug, INFO) or number; anything else is a one-line error."""
    raw = (raw or "WARNING").strip()
    level = int(raw) if raw.isdigit() else logging.getLevelName(raw.upper())
    if not isinstance(level, int):
        raise UserError(f"environment variable OCRTUNE_LOG_LEVEL={raw!r} is not a log level",
                        "set it to DEBUG, INFO, WARNING or ERROR, or unset it")
    return level


def setup_logging() -> None:
    logging.basicConfig(level=log_level(os.environ.get("OCRTUNE_LOG_LEVEL")), format="%(levelname)s %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(DemoteKernelNotices())
    for name in ("transformers", "datasets", "accelerate", "httpx"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # huggingface_hub prints through a handler of its own; passed on to ours too, each retry message
    # showed twice
    logging.getLogger("huggingface_hub").propagate = False


def main(argv: list[str] | None = None) -> None:
    from ocrtune.compat import default_cuda_allocator
    default_cuda_allocator()  # before anything touches CUDA; a user's setting wins
    argv = sys.argv[1:] if argv is None else argv
    try:
        setup_logging()
        code = run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; resume a training run with --resume_from_checkpoint last", file=sys.stderr)
        code = 130
    except Exception as e:  # last resort: known failure kinds get a one-line hint, the rest a short report
        code = _report_unexpected(e)
    sys.exit(code)


def _report_unexpected(e: Exception) -> int:
    if isinstance(e, ModuleNotFoundError) and "Could not import module" in str(e):
        return _report_broken_import(e)
    import torch
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
        print("error: CUDA out of memory; lower --batch_size (or --packing_tokens, --max_pixels, --max_length), "
              "or turn on --gradient_checkpointing true (with LoRA also --lean_mlp true)", file=sys.stderr)
        return 2
    if isinstance(e, (PermissionError,)):
        print(f"error: permission denied: {e.filename}; check the path's permissions", file=sys.stderr)
        return 2
    if isinstance(e, OSError) and getattr(e, "errno", None) == 28:
        print("error: disk full; free disk space, then resume with --resume_from_checkpoint last", file=sys.stderr)
        return 2
    if os.environ.get("OCRTUNE_DEBUG"):
        raise e
    print(f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
          "rerun with OCRTUNE_DEBUG=1 for the traceback and report it", file=sys.stderr)
    return 1


def _report_broken_import(e: ModuleNotFoundError) -> int:
    """transformers' lazy import hides the real failure (most often a torch/torchvision pair that doesn't
    match) behind "Could not import module 'X'": name the packages and what to install."""
    try:
        check_torch_stack()
    except UserError as found:
        print(f"error: {found}", file=sys.stderr)
        return found.exit_code
    if os.environ.get("OCRTUNE_DEBUG"):
        raise e
    name = str(e).split("'")[1] if str(e).count("'") >= 2 else "a model class"
    print(f"error: transformers could not import {name}, so the installed torch, torchvision and transformers "
          "don't work together; reinstall them within ocrtune's bounds: pip install -e . "
          "(OCRTUNE_DEBUG=1 shows the original import error)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    main()
