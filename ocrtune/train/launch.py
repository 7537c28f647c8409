"""NPROC_PER_NODE=N ocrtune sft|rlhf ...: re-run the same command under torchrun (SWIFT's shortcut), also
across nodes the way SWIFT users write it: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from ocrtune.errors import UserError


MAX_PROCS = 4096  # processes per node or nodes: beyond any machine, and torchrun would try to start them all


def _whole(name: str, default: str | None, fix: str, minimum: int = 1) -> int | None:
    value = os.environ.get(name, default)
    if value is None:
        return None
    if not value.isdigit() or int(value) < minimum:
        raise UserError(f"{name}={value!r} is not a {'whole' if minimum == 0 else 'positive'} number", fix)
    if int(value) > MAX_PROCS:
        raise UserError(f"{name}={value} is out of range (at most {MAX_PROCS})", fix)
    return int(value)


def torchrun_args(argv: list[str]) -> list[str] | None:
    """torchrun's arguments for this environment, or None when the command runs as it is."""
    if os.environ.get("LOCAL_RANK") is not None:  # already a rank
        return None
    nproc = _whole("NPROC_PER_NODE", None, "set it to the number of GPUs per node, e.g. NPROC_PER_NODE=2")
    nnodes = _whole("NNODES", "1", "set it to the number of machines, e.g. NNODES=2")
    if nnodes > 1 and nproc is None:
        raise UserError(f"NNODES={nnodes} without NPROC_PER_NODE", "set NPROC_PER_NODE to the processes per node, e.g. 1 per GPU")
    if (nproc or 1) * nnodes == 1:
        return None
    node_rank = _whole("NODE_RANK", "0", f"set NODE_RANK to this machine's index, 0 to {nnodes - 1}", minimum=0)
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} but NNODES={nnodes}", f"use NODE_RANK 0 to {nnodes - 1}")
    if nnodes > 1 and not os.environ.get("MASTER_ADDR"):
        raise UserError("NNODES > 1 needs MASTER_ADDR", "set MASTER_ADDR to node 0's address (and the same MASTER_PORT on every node)")
    return [f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}",
            f"--master_addr={os.environ.get('MASTER_ADDR', '127.0.0.1')}",
            f"--master_port={os.environ.get('MASTER_PORT', '29500')}", "-m", "ocrtune", *argv]  # the same command (sft or rlhf)


def rank_env(env: dict) -> dict:
    """The environment torchrun's ranks get, so that they import this very ocrtune: `python -m` puts the
    current folder first on sys.path, and from the folder that holds a clone named `ocrtune` that folder
    (a namespace package) shadows an installed ocrtune, so every rank died. PYTHONSAFEPATH (3.11+) keeps
    the current folder off sys.path; PYTHONPATH puts this package's parent before any other copy, unless that
    is site-packages (ahead of the standard library there, a package could shadow a standard module)."""
    import ocrtune
    root = Path(ocrtune.__file__).resolve().parent.parent
    if root.name in ("site-packages", "dist-packages"):
        return {**env, "PYTHONSAFEPATH": "1"}
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(root)]
    return {**env, "PYTHONSAFEPATH": "1", "PYTHONPATH": os.pathsep.join([str(root), *rest])}


def maybe_relaunch(argv: list[str]) -> None:
    args = torchrun_args(argv)
    if args is None:
        return
    os.environ.update(rank_env(dict(os.environ)))  # torchrun passes its environment on to the ranks
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    try:
        torchrun(args)
    except SystemExit as e:
        sys.exit(e.code)
    except SignalException as e:  # SIGTERM/SIGINT to the launcher: the ranks stopped after a step and saved it
        sys.exit(128 + int(e.sigval))
    except ChildFailedError as e:
        print(f"error: {rank_failure(e)}", file=sys.stderr)
        sys.exit(_exit_code(e))
    except Exception as e:  # the rendezvous failed before any rank ran: a taken port or an unreachable address
        if type(e).__name__ not in ("DistNetworkError", "RendezvousError", "RendezvousConnectionError",
                                    "RendezvousTimeoutError", "DistStoreError"):
            raise
        from ocrtune.errors import UserError
        where = f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:{os.environ.get('MASTER_PORT', '29500')}"
        raise UserError(f"torchrun could not start its rendezvous at {where} ({str(e).splitlines()[0][:160]})",
                        "set MASTER_PORT to a free port (another run may hold this one), and on several nodes "
                        "MASTER_ADDR to node 0's reachable address") from None
    sys.exit(0)


def rank_failure(e) -> str:
    """One line: which rank died first and what it said (its error file, written by trainer.run_sft)."""
    rank, f = min(e.failures.items(), key=lambda kv: (not isinstance(kv[1].message, dict), kv[1].timestamp))
    how = f"was killed by {f.signal_name()}" if f.exitcode < 0 else f"exited with code {f.exitcode}"
    said = f.message.get("message") if isinstance(f.message, dict) else f.message
    said = said if said and not said.startswith(("To enable traceback", "Signal ")) else "see its output above"
    return f"rank {rank} (node rank {os.environ.get('NODE_RANK', '0')}, local rank {f.local_rank}) {how}: {said}"


def _exit_code(e) -> int:
    codes = [f.exitcode for f in e.failures.values() if f.exitcode and f.exitcode > 0]
    return codes[0] if codes else 1
