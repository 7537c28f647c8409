"""logging.jsonl (one JSON per log step, SWIFT's keys) and TensorBoard events."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h {m}m {s}s" if h else (f"{m}m {s}s" if m else f"{s}s")


class RunLogger:
    def __init__(self, run_dir: Path, tensorboard: bool = True, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(run_dir) / "logging.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():  # drop what was logged after the checkpoint
            kept = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(Path(run_dir) / "runs"), purge_step=resume_step)
            except ImportError:
                self.writer = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            prefix = "eval" if any(k.startswith("eval_") for k in record) else "train"
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    name = k[5:] if k.startswith("eval_") else k
                    self.writer.add_scalar(f"{prefix}/{name}", v, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclasses.dataclass
class StepStats:
    """What optimizer steps add up to until they are logged: the response tokens' summed loss, their count and
    the correct ones, the summed gradient norms and the number of steps. Checkpoints keep it as trainer_state's
    `log_acc` list (`as_list`), so a resumed run logs the same averages."""
    loss_sum: float = 0.0
    tokens: int = 0
    correct: int = 0
    grad_norm: float = 0.0
    steps: int = 0

    def __add__(self, other: "StepStats") -> "StepStats":
        return StepStats(*(a + b for a, b in zip(self.as_list(), other.as_list())))

    def as_list(self) -> list:
        return [self.loss_sum, self.tokens, self.correct, self.grad_norm, self.steps]

    def record(self) -> dict:
        """The logged averages: per token for the loss and accuracy, per step for the gradient norm."""
        return {"loss": round(self.loss_sum / max(self.tokens, 1), 6), "token_acc": round(self.correct / max(self.tokens, 1), 6),
                "grad_norm": round(self.grad_norm / max(self.steps, 1), 6)}


def train_record(stats: StepStats, lr: float, step: int, total_steps: int, done: int, elapsed: float,
                 epoch: float) -> dict:
    """One training line of logging.jsonl: `stats`' averages and where the run is, after `done` steps in
    `elapsed` seconds since this process started training."""
    return {**stats.record(), "learning_rate": lr,
            "memory(GiB)": memory_gib(), "train_speed(iter/s)": round(done / max(elapsed, 1e-9), 6),
            "epoch": round(epoch, 4),
            "global_step/max_steps": f"{step}/{total_steps}",
            "percentage": f"{100 * step / total_steps:.2f}%", "elapsed_time": fmt_time(elapsed),
            "remaining_time": fmt_time(elapsed / max(done, 1) * (total_steps - step)), "step": step}


def memory_gib() -> float:
    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_reserved() / 2**30, 2)
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # peak RSS on Linux (KiB)
