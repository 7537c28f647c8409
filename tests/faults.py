"""Fault injection for tests that run `ocrtune sft` as a subprocess: the faults are installed by
wrapping ocrtune's functions in this process, never read by the package itself.

    python tests/faults.py [--nan_at_step N] [--slow_save SECONDS] [--sigterm_at_step N] [--time_up_on_rank R] sft <sft flags...>

--nan_at_step N     the loss of optimizer step N reads NaN (on every rank), just before the trainer's
                    finite check (`SftRun.check_finite`)
--slow_save SECONDS every checkpoint save after the first sleeps SECONDS after writing the weights into its
                    temporary folder (`.checkpoint-N.tmp`), so a test can kill the run mid-save with one
                    complete checkpoint behind it
--sigterm_at_step N as optimizer step N starts, SIGTERM goes to the whole process group (the loader workers
                    too), as `timeout`, Slurm or torchrun's shutdown send it; start the command in a new
                    session (`start_new_session=True`) so that the test's own process is not in that group
--time_up_on_rank R the rank R (RANK) finds its --max_time up after every step, the others never do: the ranks
                    must still stop after the same step (give --max_time so the run has a limit)

With NPROC_PER_NODE the command re-runs itself under torchrun (`ocrtune.train.launch`): the ranks run
this file with the same fault flags, not `-m ocrtune`. Tests build the command with `command(...)`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = str(Path(__file__).resolve())


def command(*argv: str, nan_at_step: int | None = None, slow_save: float | None = None,
            sigterm_at_step: int | None = None, time_up_on_rank: int | None = None) -> list[str]:
    """The argv of a subprocess that runs `ocrtune <argv>` with the given faults."""
    return [sys.executable, HERE, *fault_flags(nan_at_step, slow_save, sigterm_at_step, time_up_on_rank), *argv]


def fault_flags(nan_at_step: int | None, slow_save: float | None, sigterm_at_step: int | None = None,
                time_up_on_rank: int | None = None) -> list[str]:
    return ([f"--nan_at_step={nan_at_step}"] if nan_at_step is not None else []) + \
        ([f"--slow_save={slow_save}"] if slow_save is not None else []) + \
        ([f"--sigterm_at_step={sigterm_at_step}"] if sigterm_at_step is not None else []) + \
        ([f"--time_up_on_rank={time_up_on_rank}"] if time_up_on_rank is not None else [])


def split_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """(faults, ocrtune's argv): the leading --nan_at_step=/--slow_save=/--sigterm_at_step= flags, then the rest."""
    faults = {"nan_at_step": None, "slow_save": None, "sigterm_at_step": None, "time_up_on_rank": None}
    while argv and argv[0].startswith(("--nan_at_step=", "--slow_save=", "--sigterm_at_step=", "--time_up_on_rank=")):
        name, value = argv[0][2:].split("=", 1)
        faults[name] = float(value) if name == "slow_save" else int(value)
        argv = argv[1:]
    return faults, argv


def install(nan_at_step: int | None = None, slow_save: float | None = None, sigterm_at_step: int | None = None,
            time_up_on_rank: int | None = None) -> None:
    from ocrtune import checkpoint
    from ocrtune.train import launch
    from ocrtune.train.trainer import SftRun

    if nan_at_step is not None:
        check_finite = SftRun.check_finite

        def nan_at(self, loss_sum, grad_norm):
            if self.state["global_step"] + 1 == nan_at_step:
                loss_sum = float("nan")
            return check_finite(self, loss_sum, grad_norm)
        SftRun.check_finite = nan_at

    if sigterm_at_step is not None:
        import os
        import subprocess
        train_step = SftRun.train_step

        def sigterm_at(self, group):
            if self.state["global_step"] + 1 == sigterm_at_step:
                # sent by another process, as in real life: PyTorch's loader workers exit quietly on a SIGTERM
                # from their parent, but die by it from anyone else (and the main process then fails)
                subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgid(0)}"], check=False)
            return train_step(self, group)
        SftRun.train_step = sigterm_at

    if time_up_on_rank is not None:
        import os
        SftRun.time_is_up = lambda self: int(os.environ.get("RANK", "0")) == time_up_on_rank

    if slow_save is not None:
        save_checkpoint = checkpoint.save_checkpoint

        class SlowSave:
            """The model, whose save_pretrained sleeps once the weights are in the temporary folder."""

            def __init__(self, model):
                self._model = model

            def __getattr__(self, name):
                return getattr(self._model, name)

            def save_pretrained(self, *a, **kw):
                self._model.save_pretrained(*a, **kw)
                time.sleep(slow_save)

        saves = []

        def slow(run_dir, step, model, *a, **kw):
            saves.append(step)  # the first save is quick: the test needs one complete checkpoint behind the slow one
            return save_checkpoint(run_dir, step, SlowSave(model) if len(saves) > 1 else model, *a, **kw)
        checkpoint.save_checkpoint = slow  # the trainer calls it through the module (`ckpt_io.save_checkpoint`)

    torchrun_args = launch.torchrun_args

    def relaunch_here(argv):  # torchrun's ranks run this file with the same faults, not `-m ocrtune`
        args = torchrun_args(argv)
        if args is None:
            return None
        i = args.index("-m")
        assert args[i + 1] == "ocrtune", args
        return [*args[:i], HERE, *fault_flags(nan_at_step, slow_save, sigterm_at_step, time_up_on_rank), *args[i + 2:]]
    launch.torchrun_args = relaunch_here


def main() -> None:
    # run as a script, sys.path[0] is tests/: import ocrtune from this checkout, as `python -m ocrtune` in its root does
    sys.path.insert(0, str(Path(HERE).parents[1]))
    faults, argv = split_flags(sys.argv[1:])
    install(**faults)
    from ocrtune.cli.main import main as ocrtune_main
    ocrtune_main(argv)


if __name__ == "__main__":
    main()
