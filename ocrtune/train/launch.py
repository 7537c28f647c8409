"""NPROC_PER_NODE=N ocrtune sft ...: re-run the same command under torchrun (SWIFT's shortcut)."""
from __future__ import annotations

import os
import sys


def maybe_relaunch(argv: list[str]) -> None:
    n = os.environ.get("NPROC_PER_NODE")
    if not n or os.environ.get("LOCAL_RANK") is not None:
        return
    from ocrtune.errors import UserError
    if not n.isdigit() or int(n) < 1:
        raise UserError(f"NPROC_PER_NODE={n!r} is not a positive number", "set it to the number of GPUs, e.g. NPROC_PER_NODE=2")
    if int(n) == 1:
        return
    from torch.distributed.run import main as torchrun
    args = [f"--nproc_per_node={n}", f"--master_port={os.environ.get('MASTER_PORT', '29500')}",
            "-m", "ocrtune", "sft", *argv[1:]]
    try:
        torchrun(args)
    except SystemExit as e:
        sys.exit(e.code)
    except Exception as e:  # ChildFailedError: the ranks printed their own errors
        sys.exit(getattr(e, "exitcode", 1) or 1)
    sys.exit(0)
