"""Plots: smoothing that keeps up with short runs, markers on curves with few points."""
from __future__ import annotations

import json

import pytest

from ocrtune.plot.plots import effective_smoothing, plot_run, tb_smooth


def test_effective_smoothing_follows_the_run_length():
    # EMA window 1 / (1 - w) held to a tenth of the points: 1 - 10 / n, never above the requested weight
    assert effective_smoothing(0.9, 1000) == 0.9 and effective_smoothing(0.9, 100) == pytest.approx(0.9)
    assert effective_smoothing(0.9, 20) == pytest.approx(0.5) and effective_smoothing(0.9, 10) == 0.0
    assert effective_smoothing(0.6, 50) == 0.6 and effective_smoothing(0.0, 500) == 0.0


def test_tb_smooth_is_debiased():
    # TensorBoard: last = w * last + (1 - w) * v, shown as last / (1 - w^k); a constant stays constant
    assert tb_smooth([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)
    assert tb_smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 / 0.75])


def test_short_run_smoothed_loss_keeps_up_and_eval_points_have_markers(tmp_path, monkeypatch):
    """12 logged steps of a loss falling 6 -> 1 (slope s = 5/11 a point): smoothed at 0.9 its last
    point is still 2.94 (a debiased EMA over most of the run); at the effective w = 1 - 10/12 an EMA
    trails a ramp by s * w / (1 - w) = 0.09, so it ends within 0.15 of the raw 1.0. Two evaluation
    points are drawn with markers."""
    from matplotlib.axes import Axes
    loss = [6 - 5 * i / 11 for i in range(12)]
    records = [{"step": 5 * (i + 1), "loss": v} for i, v in enumerate(loss)]
    records += [{"step": 30, "eval_loss": 3.0}, {"step": 60, "eval_loss": 1.5}]
    (tmp_path / "logging.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    calls = []
    real = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: (calls.append((list(a[1]), k)), real(self, *a, **k))[1])
    written = plot_run(tmp_path, 0.9)
    assert {p.name for p in written} == {"train_loss.png", "eval_loss.png"}
    smoothed = [ys for ys, k in calls if "smoothed" in k.get("label", "")]
    assert len(smoothed) == 1 and abs(smoothed[0][-1] - loss[-1]) < 0.15
    assert tb_smooth(loss, 0.9)[-1] - loss[-1] > 1.9  # what the fixed 0.9 gave
    eval_call = next(k for ys, k in calls if k.get("label") == "eval_loss")
    assert eval_call["marker"] == "o"
