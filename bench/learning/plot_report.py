"""Training curves of a from-scratch recipe report (examples/latex_ocr_from_scratch.py's report.json):
loss and teacher-forced token accuracy per step for stage 1 and stage 2, validation points included.

    python bench/learning/plot_report.py bench/learning/run17_eight_bit_h200/report.json bench/learning/run17_eight_bit_h200/curves.png
"""
from __future__ import annotations

import json
import sys


def main(report: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    r = json.load(open(report))
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, stage in enumerate(("stage1", "stage2")):
        s = r.get(stage) or {}
        train, evals = s.get("train_log") or [], s.get("eval_log") or []
        for row, (key, ekey, label) in enumerate((("loss", "eval_loss", "loss"), ("token_acc", "eval_acc", "token accuracy"))):
            ax = axes[row][col]
            ax.plot([x["step"] for x in train], [x[key] for x in train], label="train")
            ax.plot([x["step"] for x in evals], [x[ekey] for x in evals], "o-", label="validation")
            ax.set(title=f"{stage}: {label}", xlabel="step")
            ax.legend()
    bleu = lambda key: f"{r[key]['bleu4']:.3f}" if r.get(key) else "-"  # noqa: E731 (a failed stage has none)
    fig.suptitle(f"{r.get('device', '')}: print BLEU-4 {bleu('print')}, handwrite "
                 f"{bleu('handwrite_before')} -> {bleu('handwrite_after')}")
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main(*sys.argv[1:3])
