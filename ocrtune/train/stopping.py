"""Why a run stops before its last step, as one object the step loop reads (`StopRequest`): SIGTERM or SIGINT
(`stop_on_sigterm`), `--max_time`, and the clock decay of `--lr_decay_seconds` reaching 0 at `--max_time`."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from pathlib import Path

STOP_CHECK_EVERY = 16  # micro-batches between the ranks' joint checks for a signal inside a group


class StopMidGroup(Exception):
    """Raised by train_step when a signal asks to stop between two micro-batches of a group."""


class stop_on_sigterm:
    """While training: SIGTERM, or SIGINT (Ctrl-C) alike, asks the loop to stop and save instead of killing the
    process: after the current step, or between two micro-batches of a long gradient accumulation (the group is
    dropped, the last completed step saved). A second one aborts at once: SIGINT raises KeyboardInterrupt, a
    second SIGTERM kills the process by its default action. No handler is installed outside the main thread,
    where Python allows none."""
    _UNSET = object()
    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested, self.signum, self._previous = False, signal.SIGTERM, {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # the second: no more waiting
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested, self.signum = True, signum
        if os.environ.get("RANK", "0") == "0":
            print(f"{signal.Signals(signum).name}: stopping after the current micro-batch, saving the last completed "
                  "step (send it again to abort at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():  # None: a handler not set from Python; the default then
            signal.signal(s, signal.SIG_DFL if previous is None else previous)
        return False



@dataclasses.dataclass
class StopRequest:
    """The step loop's stop state, the same on every rank (the flags ride in each step's last all-reduce).
    `now`: stop after the step in progress; `by_signal`: a signal asked it (else --max_time did);
    `clock_decay`: --lr_decay_seconds is on, so a --max_time stop is the run's planned end, not a pause."""
    signals: stop_on_sigterm
    clock_decay: bool = False
    now: bool = False
    by_signal: bool = False

    @property
    def requested(self) -> bool:
        """A signal arrived in this process (not yet agreed with the other ranks)."""
        return self.signals.requested

    @property
    def decayed(self) -> bool:
        """The clock's schedule reached 0 at --max_time: the run is done, not paused."""
        return self.clock_decay and self.now and not self.by_signal

    def why(self, max_time) -> str:
        return f"by {self.signals.name}" if self.by_signal else f"at --max_time {max_time:g}s"

    def report(self, stopped_at: int, run_dir: Path, max_time) -> str:
        """The line a stopped run ends with: the checkpoint it saved and how to resume, or that there was none."""
        why, ckpt = self.why(max_time), run_dir / f"checkpoint-{stopped_at}"
        if stopped_at and ckpt.exists():
            return f"stopped {why} at step {stopped_at}; saved {ckpt}; resume with --resume_from_checkpoint last"
        return f"stopped {why} before the first optimizer step; nothing to save; start the run again"

    def exit_status(self) -> int | None:
        """The signal's exit status (143 SIGTERM, 130 SIGINT) when one stopped the run."""
        return 128 + self.signals.signum if self.by_signal else None
