"""PNG plots of a run from its logging.jsonl (`ocrtune plot <run dir>` redraws them)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ocrtune.errors import UserError
from ocrtune.fileio import check_not_input

TRAIN_KEYS = {"loss": "train_loss", "learning_rate": "train_learning_rate", "token_acc": "train_token_acc",
              "grad_norm": "train_grad_norm", "memory(GiB)": "train_memory",
              # rlhf (GRPO) runs; each reward's own mean is added per run (`reward/<name>/mean`)
              "reward": "train_reward", "kl": "train_kl", "completion_length": "train_completion_length"}


MARKER_POINTS = 30


def tb_smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's debiased exponential moving average (its 'smoothing' slider)."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def effective_smoothing(weight: float, n: int) -> float:
    """The smoothing actually used for a curve of n points. An EMA of weight w averages over about
    1 / (1 - w) points; keep that to a tenth of the curve, so a short run's smoothed loss is not a
    lagging average of most of the run (0.9 from 100 points on, 0.5 at 20, none under 10)."""
    return max(0.0, min(weight, 1.0 - 10.0 / max(n, 1)))


MAX_LOG_BYTES = 1 * 2**30  # a million steps log about 400 MB


def read_log(run_dir: Path) -> list[dict]:
    if not Path(run_dir).is_dir():
        raise UserError(f"run folder {run_dir} does not exist" if not Path(run_dir).exists()
                        else f"{run_dir} is not a folder", "pass a run folder written by ocrtune sft (output/<model>/v<N>-...)")
    path = Path(run_dir) / "logging.jsonl"
    if not path.exists():
        raise UserError(f"{run_dir} has no logging.jsonl", "pass a run folder written by ocrtune sft (output/<model>/v<N>-...)")
    fix = "pass the logging.jsonl that ocrtune sft wrote (one JSON object a line), or move the damaged file away"
    from ocrtune.fileio import UnsafeFile, read_bounded
    try:  # a regular file, bounded: a FIFO or /dev/zero under that name would hang or exhaust memory
        text = read_bounded(path, MAX_LOG_BYTES, "training log").decode("utf-8")
    except UnsafeFile as e:
        raise UserError(str(e), "pass a run folder written by ocrtune sft (output/<model>/v<N>-...)") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x})", fix) from None
    except OSError as e:
        raise UserError(f"can't read {path}: {e.strerror}", fix) from None
    lines = [(n, l) for n, l in enumerate(text.splitlines(), 1) if l.strip()]
    records = []
    for n, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if n == lines[-1][0]:  # the last line of a run killed while writing it
                break
            raise UserError(f"line {n} of {path} is not valid JSON ({e.msg})", fix) from None
        if not isinstance(record, dict):
            raise UserError(f"line {n} of {path} is not a JSON object", fix)
        records.append(record)
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records
           if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), (int, float))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_run(run_dir: Path, smoothing: float = 0.9) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(run_dir)
    out_dir = Path(run_dir) / "images"
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, where the plots go", "move it away")
    out_dir.mkdir(exist_ok=True)
    names = dict(TRAIN_KEYS)
    names.update({k: k for r in records for k in r if k.startswith("eval_") and isinstance(r[k], (int, float))})
    names.update({k: "train_reward_" + re.sub(r"[^\w.-]", "_", k.split("/")[1]).lstrip(".") for r in records for k in r
                  if k.startswith("reward/") and k.endswith("/mean") and k.count("/") == 2})
    written = []
    for key, name in names.items():
        steps, values = series(records, key)
        if not steps:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        weight = effective_smoothing(smoothing, len(values))
        smooth = (key in ("loss", "token_acc", "grad_norm", "reward") or key.startswith("reward/")) and weight > 0
        few = len(steps) <= MARKER_POINTS  # evaluation curves: each point is worth seeing
        ax.plot(steps, values, color="#1f77b4", alpha=0.35 if smooth else 1.0, marker="o" if few else "", label=key)
        if smooth:
            ax.plot(steps, tb_smooth(values, weight), color="#1f77b4", label=f"{key} (smoothed {weight:.2g})")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{name}.png"
        check_not_input("the plot", path, [("the log", Path(run_dir) / "logging.jsonl")])  # e.g. through a symlink
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
