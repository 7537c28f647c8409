"""--fp8_base (ocrtune/models/fp8_linear.py) on the CPU: the frozen base linears as float8 e4m3 with a
float32 scale per output channel. Here the float8 operands are multiplied in float32 (the same rounded
values `torch._scaled_mm` multiplies on CUDA; tests/test_cuda.py checks that kernel against this path)."""
import pytest
import torch
from torch import nn

from test_lora_addmm import _loss_grads_kept, _lora_model, _sample_batch


def _dq(q, s):
    return q.double() * s.double()


def test_fp8_linear_is_the_math_on_the_rounded_operands():
    """Forward: x rounded per row times W rounded per output channel, float32 accumulation; backward: dy times
    W's scales, rounded per row, times W's float8 values. Each operand within 2^-4 of itself, so the output
    within ~2^-3 of the exact product (measured ~0.03)."""
    from ocrtune.models.fp8_linear import Fp8BaseLinear, quantize_rows
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 48, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(48, 64, generator=g) * torch.logspace(-2, 1, 48)[:, None])
    lin.requires_grad_(False)
    f8 = Fp8BaseLinear(lin)
    assert f8.weight_q.dtype == torch.float8_e4m3fn and f8.scale.dtype == torch.float32
    x = (torch.randn(2, 5, 64, generator=g) * 3).requires_grad_()
    y = f8(x)
    xq, xs = quantize_rows(x)
    want = _dq(xq, xs) @ _dq(f8.weight_q, f8.scale[:, None]).t() + lin.bias.double()
    assert y.shape == (2, 5, 48) and torch.allclose(y.double().view(10, 48), want, rtol=1e-5, atol=1e-5)
    exact = x.double() @ lin.weight.double().t() + lin.bias.double()
    assert (y.double() - exact).norm() <= 2 ** -3 * exact.norm()
    dy = torch.randn(2, 5, 48, generator=g)
    (dx,) = torch.autograd.grad(y, x, dy)
    gq, gs = quantize_rows(dy * f8.scale)
    want_dx = _dq(gq, gs) @ f8.weight_q.double()
    assert torch.allclose(dx.double().view(10, 64), want_dx, rtol=1e-5, atol=1e-5)
    exact_dx = dy.double() @ lin.weight.double()
    assert (dx.double() - exact_dx).norm() <= 2 ** -3 * exact_dx.norm()
    assert (dx.double() - exact_dx).norm() > 1e-4 * exact_dx.norm()  # the rounding is really there


def test_fp8_linear_keeps_its_float8_values_through_model_to_dtype():
    """`model.to(torch.bfloat16)` (done by loaders and wrappers) must not turn the float8 values or their
    float32 scales into bf16: they are stored under integer views."""
    from ocrtune.models.fp8_linear import Fp8BaseLinear
    lin = nn.Linear(32, 16).requires_grad_(False)
    f8 = Fp8BaseLinear(lin)
    q, s = f8.weight_q.clone(), f8.scale.clone()
    f8.to(torch.bfloat16)
    assert torch.equal(f8.weight_q.view(torch.uint8), q.view(torch.uint8)) and torch.equal(f8.scale, s)
    assert f8.bias.dtype == torch.bfloat16 and f8.state_dict().keys() == {"bias"}


@pytest.mark.parametrize("lean", [False, True])
def test_fp8_base_model_trains_near_the_bf16_one_with_half_the_base_bytes(tiny_model_dir, lean):
    """The tiny LoRA model with every language-model base linear in float8 (with and without --lean_mlp, whose
    down projection then multiplies the float8 weights itself), against the same model unconverted: the loss
    within 2^-6 relative, the LoRA gradients pointing the same way (cosine >= 0.97 over all of them, >= 0.9
    for each tensor; measured 0.99 and 0.96: every product rounds its operands by up to 2^-4, and this random
    model's gradients move about 4x the relative change of its activations: 13% in L2, almost all from the
    forward's rounding); the base weights are gone from the parameters, kept in float8 at one byte a value."""
    from ocrtune.models.fp8_linear import Fp8BaseLinear
    from ocrtune.models.patches import PatchOptions, prepare
    from ocrtune.models.patches.common import causal_lm
    batch = _sample_batch(tiny_model_dir)
    results = {}
    for fp8 in (False, True):
        model, _ = _lora_model(tiny_model_dir, lean)
        if fp8:
            applied = prepare(model, PatchOptions(patch_embed=False, fp8_base=True))
        results[fp8] = _loss_grads_kept(model, batch)[:2]
    text = model.config.text_config
    assert applied["fp8_base"] == 7 * text.num_hidden_layers  # q k v o gate up down
    lm = causal_lm(model).model.language_model
    f8 = [m for m in lm.modules() if isinstance(m, Fp8BaseLinear)]
    assert len(f8) == applied["fp8_base"] and all(m.weight_fp8.element_size() == 1 for m in f8)
    assert not [n for n, _ in lm.named_parameters() if "base_layer.weight" in n]
    (l0, g0), (l1, g1) = results[False], results[True]
    assert abs(l1 - l0) <= 2 ** -6 * abs(l0) and l1 != l0
    cos = torch.nn.functional.cosine_similarity
    keys = [k for k, g in g0.items() if g.abs().sum() > 0]
    assert cos(torch.cat([g0[k].flatten() for k in keys]), torch.cat([g1[k].flatten() for k in keys]), dim=0) >= 0.97
    for k in keys:
        assert cos(g0[k].flatten(), g1[k].flatten(), dim=0) >= 0.9, k


def test_fp8_base_flag_trains_and_refuses_full_fine_tuning(tiny_model_dir, tmp_path):
    """`ocrtune sft --fp8_base true` on the embedded defaults: one line says how many base linears became
    float8, and the loss falls (last logged under 0.9x the first); with --train_type full, a one-line error."""
    import json
    import subprocess
    import sys
    common = [sys.executable, "-m", "ocrtune", "sft", "--model", "tiny", "--dataset", "latex-ocr-sample#32", "--max_steps", "12",
              "--learning_rate", "2e-3", "--lora_dropout", "0", "--logging_steps", "1", "--eval_steps", "100",
              "--report_to", "none", "--fp8_base", "true", "--output_dir", str(tmp_path)]
    full = subprocess.run(common + ["--train_type", "full"], capture_output=True, text=True, timeout=600)
    assert full.returncode == 2 and "--fp8_base" in full.stderr and "Traceback" not in full.stderr, full.stderr[-2000:]
    run = subprocess.run(common, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "--fp8_base: " in run.stdout and " base linears of the language model in float8 e4m3" in run.stdout
    (log_file,) = tmp_path.glob("*/v*-*/logging.jsonl")
    losses = [r["loss"] for r in map(json.loads, log_file.read_text().splitlines()) if "loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.9 * losses[0], losses


def test_fp8_base_setup_on_cpu_and_ddp_keeps_its_buffers_local():
    """Off CUDA there is nothing to refuse (the products are emulated); under DDP the float8 weights, buffers
    that are the same on every rank, are not broadcast from rank 0 every step (about 7 GB on 7B)."""
    from ocrtune.models.fp8_linear import float8_matmul_reason
    from ocrtune.train.args import SftArgs
    from ocrtune.train.distributed import accelerator_kwargs
    assert float8_matmul_reason(torch.device("cpu"), torch.float32) is None
    (handler,) = accelerator_kwargs(SftArgs(fp8_base=True))["kwargs_handlers"]
    assert handler.broadcast_buffers is False
    assert "kwargs_handlers" not in accelerator_kwargs(SftArgs())
