"""The memory plan behind the default speed on a GPU (`ocrtune/train/memory_plan.py`): its activation model against
the peaks measured on H100/H200, the choice it makes, the correction from the first steps, and the pieces SftRun
uses on a CPU (where no plan is made)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ocrtune.train.memory_plan import (GIB, USABLE_SHARE, Plan, Shape, activation_bytes, choose, corrected,
                                       longest_micro_batch, plan_line)

ROOT = Path(__file__).resolve().parents[1]
QWEN2_VL_7B, QWEN2_VL_2B = Shape(28, 3584, 18944), Shape(28, 1536, 8960)
# held before the activations: the bf16 weights (8,291,375,616 and 2,208,985,600 parameters) and the r=8 adapters
# with their gradients and AdamW state
STATIC_GIB = {"7b": 15.7, "2b": 4.2}
# reserved memory after a larger setting in the same process (fragmentation: docs/performance.md): the allocated peak
ALLOCATED_GIB = {("frontier_7b_h200.json", 16384, 14): 56.5}


def measured_points():
    """(shape, static GiB, tokens, recomputing layers, lean MLP, measured peak GiB) from the committed frontiers."""
    files = {"frontier_7b_h200.json": ("7b", False), "frontier_2b_h200.json": ("2b", False),
             "frontier_7b_lean_mlp_triton.json": ("7b", True)}
    for name, (size, lean) in files.items():
        for s in json.loads((ROOT / "bench" / "results" / name).read_text())["settings"]:
            if s.get("max_reserved_gib") and s.get("samples_per_s"):  # a setting that ran (no out-of-memory)
                peak = ALLOCATED_GIB.get((name, s["packing_tokens"], s["recompute_layers"]), s["max_reserved_gib"])
                yield (QWEN2_VL_7B if size == "7b" else QWEN2_VL_2B, STATIC_GIB[size], s["packing_tokens"],
                       s["recompute_layers"], lean, peak)


def test_the_activation_model_errs_a_little_high_on_every_measured_peak():
    points = list(measured_points())
    assert len(points) >= 10
    for shape, static, tokens, recompute, lean, peak in points:
        predicted = static + activation_bytes(shape, tokens, recompute, lean) / GIB
        # never under (a plan must not run out of memory), at most 20% over (or it recomputes for nothing)
        assert peak <= predicted <= 1.2 * peak, (shape, tokens, recompute, lean, peak, predicted)


def test_recomputing_and_the_lean_mlp_lower_the_prediction_by_what_they_drop():
    s = QWEN2_VL_7B
    full, none = activation_bytes(s, 1000, s.layers, False), activation_bytes(s, 1000, 0, False)
    assert full < none / 4
    # the lean MLP drops one [tokens, intermediate] bf16 tensor a layer that keeps its activations
    assert activation_bytes(s, 1000, 0, False) - activation_bytes(s, 1000, 0, True) == 1000 * 28 * 2 * 18944
    assert activation_bytes(s, 2000, 5, True) == 2 * activation_bytes(s, 1000, 5, True)


def test_choose_takes_the_fewest_recomputing_layers_that_fit():
    s, static = QWEN2_VL_7B, 15.9 * GIB
    h100 = choose(s, 16384, static, 79.2 * GIB, lean=True)
    assert h100.fits and 0 < h100.recompute < s.layers
    assert h100.predicted <= h100.usable == pytest.approx(79.2 * GIB * USABLE_SHARE - GIB)
    # one layer fewer would not have fitted
    assert static + activation_bytes(s, 16384, h100.recompute - 1, True) > h100.usable
    # more memory, fewer layers; fewer tokens, fewer layers; a 141 GB card keeps every layer's activations
    assert choose(s, 16384, static, 139.8 * GIB, lean=True).recompute == 0
    assert choose(s, 8192, static, 79.2 * GIB, lean=True).recompute < h100.recompute
    # without the lean MLP more layers must recompute
    assert choose(s, 16384, static, 79.2 * GIB, lean=False).recompute > h100.recompute
    # 2B at 16k tokens fits an 80 GB card without recompute
    assert choose(QWEN2_VL_2B, 16384, 4.4 * GIB, 79.2 * GIB, lean=True).recompute == 0


def test_a_step_that_cannot_fit_is_known_before_it_runs():
    plan = choose(QWEN2_VL_7B, 262_144, 15.9 * GIB, 79.2 * GIB, lean=True)
    assert not plan.fits and plan.recompute == 28 and plan.predicted > plan.usable
    assert "262,144 tokens" in plan_line(plan)


def test_the_first_steps_raise_the_recompute_when_they_measure_more():
    s, static = QWEN2_VL_7B, 15.9 * GIB
    plan = choose(s, 16384, static, 79.2 * GIB, lean=True)
    # a short first step (4,000 tokens) that used as predicted: nothing changes
    as_predicted = static + activation_bytes(s, 4000, plan.recompute, True)
    assert corrected(plan, 4000, as_predicted) is None
    # a short step that measured less is no evidence for the longest: never fewer layers from it
    assert corrected(plan, 4000, static + 0.7 * activation_bytes(s, 4000, plan.recompute, True)) is None
    # 15% more activations than predicted: the longest step would not fit, so more layers recompute
    over = static + 1.15 * activation_bytes(s, 4000, plan.recompute, True)
    again = corrected(plan, 4000, over)
    assert again is not None and again.recompute > plan.recompute and again.fits
    assert again.scale == pytest.approx(1.15)
    assert again.predicted == pytest.approx(static + 1.15 * activation_bytes(s, 16384, again.recompute, True))
    # the scale is kept: a later step measuring as the first did changes nothing more
    assert corrected(again, 4000, static + 1.15 * activation_bytes(s, 4000, again.recompute, True)) is None


def test_the_longest_micro_batch():
    from ocrtune.train.args import SftArgs
    assert longest_micro_batch(SftArgs(packing=True, packing_tokens=16384, batch_size=4), None) == 16384
    assert longest_micro_batch(SftArgs(batch_size=4), [100, 250, 0, 30]) == 1000
    # packing without a budget packs batch_size rows a step
    assert longest_micro_batch(SftArgs(packing=True, batch_size=8), [100, 250]) == 2000
    assert longest_micro_batch(SftArgs(batch_size=2, max_length=512), []) == 1024


def test_limit_recompute_can_be_raised_again(tiny_model_dir):
    """The plan's correction raises the count between steps, after a first call turned layers off."""
    from ocrtune.compat import enable_activation_checkpointing
    from ocrtune.models.loading import load_model
    from ocrtune.models.patches.blocks import limit_recompute
    from ocrtune.models.patches.common import causal_lm
    model = load_model(tiny_model_dir, None, "sdpa")
    enable_activation_checkpointing(model)
    layers = causal_lm(model).model.language_model.layers
    assert limit_recompute(model, 0) == 0 and not any(m.gradient_checkpointing for m in layers)
    assert limit_recompute(model, 1) == 1
    assert [m.gradient_checkpointing for m in layers] == [True] + [False] * (len(layers) - 1)


def test_no_plan_on_a_cpu(tmp_path):
    """On a CPU the run keeps what it was given (the plan is a GPU default)."""
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    run = SftRun(SftArgs(model="tiny", dataset=["latex-ocr-sample#8"], max_steps=1, output_dir=str(tmp_path),
                         report_to=["none"], dataset_test_ratio=0.0))
    assert run.plan is None and run.args.recompute_layers is None and run.args.lean_mlp is False


def test_plan_fields_round_trip():
    plan = Plan(QWEN2_VL_7B, 3, True, 100, 1.0, 2.0, 3.0, 4.0)
    assert plan.fits and plan.scale == 1.0


def test_a_full_step_that_measured_less_lets_fewer_layers_recompute():
    """As on the H100 (bench/results/speed3_7b_h100.json): 7B at 16,384 tokens measured ~0.86x the model's
    activations, so fewer layers need to recompute; never below MIN_SCALE of the model, whatever was measured."""
    from ocrtune.train.memory_plan import MIN_SCALE
    s, static = QWEN2_VL_7B, 15.9 * GIB
    plan = choose(s, 16384, static, 79.2 * GIB, lean=True)
    less = corrected(plan, 16000, static + 0.86 * activation_bytes(s, 16000, plan.recompute, True))
    assert less is not None and less.recompute < plan.recompute and less.fits
    assert less.scale == pytest.approx(0.86)
    # a second step at the new count that measures the same keeps it
    assert corrected(less, 16000, static + 0.86 * activation_bytes(s, 16000, less.recompute, True)) is None
    floor = corrected(plan, 16000, static + 0.1 * activation_bytes(s, 16000, plan.recompute, True))
    assert floor.scale == MIN_SCALE


def test_the_static_part_counts_weights_still_on_the_host(tiny_model_dir):
    """The run moves the model to the card after the plan: its weights count even while on the CPU."""
    from ocrtune.models.loading import load_model
    from ocrtune.train.memory_plan import model_bytes
    model = load_model(tiny_model_dir, None, "sdpa")
    assert model_bytes(model) == sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    assert model_bytes(model) > 10**6
