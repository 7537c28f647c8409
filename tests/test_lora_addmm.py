"""lora_addmm: PEFT's LoRA math with the dropout mask regenerated in backward instead of stored."""
import pytest
import torch

from ocrtune.models.lora_addmm import _LoraAddmm, _mask_of, _SwigluDownLora, lora_addmm, swiglu_down_lora

T, D_IN, D_OUT, R = 64, 48, 40, 8


def _inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(2, T // 2, D_OUT), mk(2, T // 2, D_IN), mk(R, D_IN), mk(D_OUT, R)


def _grads(out, tensors):
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)  # a fixed, non-uniform upstream gradient
    return torch.autograd.grad((out * w).sum(), tensors)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_values_and_gradients_match_plain_autograd(p):
    result, x, a, b = _inputs()
    seed, s = 1234, 0.5
    out = _LoraAddmm.apply(result, x, a, b, s, p, seed, torch.float64, False)
    xd = x * _mask_of(x.shape, x.dtype, x.device, p, seed) if p else x  # the same mask, kept by autograd the ordinary way
    ref = result + s * (xd @ a.t()) @ b.t()
    # float64 throughout: differences are rounding only (a few ulps of values of size ~10)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    for got, want in zip(_grads(out, (result, x, a, b)), _grads(ref, (result, x, a, b))):
        assert torch.allclose(got, want, rtol=0, atol=1e-11)


def test_mask_is_reproducible_and_has_the_right_rate():
    x = torch.ones(200, 500)
    m1, m2, m3 = (_mask_of(x.shape, x.dtype, x.device, 0.25, s) for s in (7, 7, 8))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    assert m1.unique().tolist() == [0.0, torch.tensor(1 / 0.75).item()]  # float32 scale
    keep = (m1 > 0).float().mean().item()
    assert abs(keep - 0.75) < 4 * (0.75 * 0.25 / x.numel()) ** 0.5  # 4 standard deviations of a binomial mean


def test_keeps_nothing_but_its_input_for_backward():
    """PEFT keeps a dropped copy of x and its mask per layer; lora_addmm keeps x itself (shared with the
    other branches reading it) plus rank-r tensors and the weights."""
    result, x, a, b = _inputs(torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_addmm(result, x, a, b, 0.5, p=0.3)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()
    small = sum(t.numel() for t in saved if t is not big[0])
    assert small <= T * R + a.numel() + b.numel()

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # PEFT's way, for contrast
        h = torch.nn.functional.dropout(x, 0.3, training=True) @ a.t()
        _ = result + 0.5 * h @ b.t()
    assert sum(t.numel() for t in saved if t.numel() >= x.numel()) >= 2 * x.numel()


def test_dropout_changes_between_calls_and_eval_path_has_no_graph():
    result, x, a, b = _inputs(torch.float32)
    o1, o2 = lora_addmm(result, x, a, b, 1.0, p=0.5), lora_addmm(result, x, a, b, 1.0, p=0.5)
    assert not torch.equal(o1, o2)
    with torch.no_grad():
        o = lora_addmm(result, x, a, b, 1.0, p=0.0)
    assert o.grad_fn is None
    assert torch.allclose(o, result + (x @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)


def test_fused_peft_layer_with_dropout_trains_like_peft():
    """A PEFT LoRA Linear with dropout: the patched forward's gradients equal PEFT's own when both see the
    same mask (the patched layer's mask is replayed into PEFT's dropout)."""
    from peft import LoraConfig, get_peft_model

    from ocrtune.models.patches import lora
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(D_IN, D_OUT, bias=False))
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=16, lora_dropout=0.2, target_modules=["0"]))
    layer = model.base_model.model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(T, D_IN, requires_grad=True)
    seeds = []
    real_randint = torch.randint

    def spy(*args, **kw):
        out = real_randint(*args, **kw)
        seeds.append(int(out.item()))
        return out

    assert lora.fuse_lora_linears(model) == 1
    torch.randint = spy
    try:
        out = model(x)
    finally:
        torch.randint = real_randint
    got = _grads(out, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    mask = _mask_of(x.shape, x.dtype, x.device, 0.2, seeds[0])

    class Replay(torch.nn.Module):
        def forward(self, t):
            return t * mask

    layer.lora_dropout["default"] = Replay()
    layer.forward = layer._ocrtune_stock_forward
    ref = model(x)
    want = _grads(ref, (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- swiglu_down_lora (--lean_mlp)

D_MID = 56  # the MLP's intermediate width


def _mlp_inputs(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    gate, up = mk(2, T // 2, D_MID).requires_grad_(), mk(2, T // 2, D_MID).requires_grad_()
    return gate, up, mk(D_OUT, D_MID), mk(D_OUT), mk(R, D_MID).requires_grad_(), mk(D_OUT, R).requires_grad_()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_swiglu_down_lora_matches_the_unfused_mlp_tail(p):
    """Values and gradients (gate, up, bias-free LoRA weights) equal down(silu(gate) * up) + LoRA computed by
    plain autograd with the same dropout mask; float64, so differences are rounding only."""
    gate, up, w, bias, a, b = _mlp_inputs()
    seed, s = 99, 0.5
    out = _SwigluDownLora.apply(gate, up, w, bias, a, b, s, p, seed, torch.float64)
    h = torch.nn.functional.silu(gate) * up
    hd = h * _mask_of(h.shape, h.dtype, h.device, p, seed) if p else h
    ref = torch.nn.functional.linear(h, w, bias) + s * (hd @ a.t()) @ b.t()
    assert torch.allclose(out, ref, rtol=0, atol=1e-11)
    for got, want in zip(_grads(out, (gate, up, a, b)), _grads(ref, (gate, up, a, b))):
        assert torch.allclose(got, want, rtol=0, atol=1e-10)


def test_swiglu_down_lora_keeps_gate_and_up_not_their_product():
    gate, up, w, bias, a, b = _mlp_inputs(torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu_down_lora(gate, up, w, None, a, b, 0.5, p=0.3)
    big = {t.data_ptr() for t in saved if t.numel() >= gate.numel()}
    assert big == {gate.data_ptr(), up.data_ptr()}
    assert sum(t.numel() for t in saved if t.data_ptr() not in big) <= T * R + a.numel() + b.numel() + w.numel()


def _lora_model(tiny_model_dir, lean: bool, dropout: float = 0.0, recompute: bool = False):
    from peft import LoraConfig, get_peft_model

    from ocrtune.compat import enable_activation_checkpointing, quiet_peft_deprecations
    from ocrtune.models.loading import load_model, lora_target_regex
    from ocrtune.models.patches import PatchOptions, prepare
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, torch.float32, "sdpa")
    model.requires_grad_(False)
    with quiet_peft_deprecations():
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                 target_modules=lora_target_regex(model, ["all-linear"])))
    for n, prm in model.named_parameters():  # B starts at zero: give the LoRA path a value to check
        if "lora_B" in n:
            torch.nn.init.normal_(prm, std=0.1)
    if recompute:
        enable_activation_checkpointing(model, use_reentrant=False)
    model.train()
    applied = prepare(model, PatchOptions(patch_embed=False, fused_lora=True, lean_mlp=lean))
    return model, applied


def _sample_batch(tiny_model_dir):
    """Three bundled sample rows through the tiny model's template, as one padded batch."""
    from ocrtune.data.registry import SAMPLE_DIR
    from ocrtune.models.loading import load_processor
    from ocrtune.models.template import Template, collate
    from ocrtune.train.data import EncodedDataset, parquet_rows
    ds = EncodedDataset(parquet_rows(SAMPLE_DIR / "train.parquet", limit=3),
                        Template(load_processor(tiny_model_dir), "qwen2_vl", 2048))
    return collate([ds[i] for i in range(len(ds))], 0)


def _loss_grads_kept(model, batch):
    """(loss, the trainable parameters' gradients, bytes of the distinct storages autograd kept for backward)."""
    from ocrtune.train.loss import ResponseLoss
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, n, _ = ResponseLoss(model)(**batch)
    (loss / n).backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}, sum(saved.values())


def test_lean_mlp_model_trains_like_the_fused_one_and_keeps_less(tiny_model_dir):
    """The whole tiny LoRA model with --lean_mlp: same loss and LoRA gradients as with fused LoRA alone
    (float32; tolerance from the depth and width of the network), and per decoder layer two fewer
    [tokens, intermediate] tensors kept for backward on the stock MLP (silu(gate) and the product h)."""
    from tolerance import float32_atol, matmul_stages
    batch = _sample_batch(tiny_model_dir)
    results = {}
    for lean in (False, True):
        model, applied = _lora_model(tiny_model_dir, lean)
        results[lean] = (*_loss_grads_kept(model, batch), applied)
    cfg = _lora_model(tiny_model_dir, False)[0].config
    text = cfg.text_config
    assert results[True][3]["lean_mlp"] == text.num_hidden_layers and "lean_mlp" not in results[False][3]
    depth, width = matmul_stages(cfg)
    assert torch.allclose(results[True][0], results[False][0], rtol=0, atol=float32_atol(results[False][0], depth, width))
    for k, g in results[False][1].items():
        assert torch.allclose(results[True][1][k], g, rtol=0, atol=float32_atol(g, 2 * depth, width)), k
    tokens = batch["input_ids"].numel()
    fewer = results[False][2] - results[True][2]
    assert fewer == 2 * text.num_hidden_layers * tokens * text.intermediate_size * 4


def test_lean_mlp_with_dropout_and_recompute_draws_the_same_masks(tiny_model_dir):
    """LoRA dropout 0.2 under gradient checkpointing: the lean MLP draws its seeds in the fused path's order
    (q, k, v, o, gate, up, down) and the recompute replays them (checkpoint restores the RNG), so loss and
    gradients equal the fused path's within float32 rounding; a different mask would move them by ~20%."""
    from ocrtune.train.loss import ResponseLoss
    from tolerance import float32_atol, matmul_stages
    batch = _sample_batch(tiny_model_dir)
    results = {}
    for lean in (False, True):
        model, _ = _lora_model(tiny_model_dir, lean, dropout=0.2, recompute=True)
        torch.manual_seed(123)
        loss, n, _ = ResponseLoss(model)(**batch)
        (loss / n).backward()
        results[lean] = (loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    depth, width = matmul_stages(model.config)
    assert torch.allclose(results[True][0], results[False][0], rtol=0, atol=float32_atol(results[False][0], depth, width))
    for k, g in results[False][1].items():
        assert torch.allclose(results[True][1][k], g, rtol=0, atol=float32_atol(g, 2 * depth, width)), k


# ---------------------------------------------------------------- --lean_mlp_fp8: gate/up kept in float8

@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_fp8_rows_round_each_value_within_e4m3_precision(dtype):
    """Every kept value is within 2^-4 of itself (3 mantissa bits, round to nearest) or 2^-10 of its row's
    scale (the subnormal spacing is 2^-9 of it), up to float32 rounding of the scaling; each row's largest
    value maps to 448; a zero row stays 0, and small rows too in float16 (where 1/scale would overflow)."""
    from ocrtune.models.lora_addmm import FP8, fp8_rows, from_fp8_rows
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([1e-3, 1e-2, 1.0, 30.0, 1e4, 0.0], dtype=torch.float64)
    x = (torch.randn(6, 300, generator=g, dtype=torch.float64) * rows[:, None]).to(dtype)
    q, scale = fp8_rows(x.view(2, 3, 300))
    assert q.dtype == FP8 and q.shape == (6, 300) and scale.shape == (6, 1) and scale.dtype == torch.float32
    back = from_fp8_rows(q, scale, dtype)
    assert back.dtype == dtype and bool(back.isfinite().all())
    x64, err = x.double(), (from_fp8_rows(q, scale, torch.float64) - x.double()).abs()
    assert bool((err <= (2 ** -4 * x64.abs() + 2 ** -10 * scale.double()) * (1 + 2 ** -20)).all())
    assert torch.equal(q[:5].float().abs().amax(-1), torch.full((5,), 448.0)) and not back[5].any()


def test_swiglu_down_lora_fp8_in_float16_keeps_small_and_zero_rows_finite():
    """float16 (--dtype float16): rows whose largest value is under 448/65504 ~ 0.007, and zero rows, give
    finite gradients (scaling in float16 would turn them into inf x 0 = NaN)."""
    gate, up, w, bias, a, b = (t.detach().to(torch.float16) for t in _mlp_inputs(torch.float32))
    gate[0, :3] = 0.0
    up[0, 3:6] *= 1e-3
    gate, up, a, b = (t.requires_grad_() for t in (gate, up, a, b))
    out = swiglu_down_lora(gate, up, w, None, a, b, 0.5, fp8=True)
    for grad in _grads(out, (gate, up, a, b)):
        assert bool(grad.isfinite().all())


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_swiglu_down_lora_fp8_backward_is_the_math_on_the_kept_values(p):
    """With fp8 the forward is unchanged (bit for bit) and the backward is exactly the MLP tail's gradient
    taken at the float8-rounded gate and up (float64: rounding only), except B's, which uses the forward's
    own rank-r product and so equals the plain path's."""
    from ocrtune.models.lora_addmm import fp8_rows, from_fp8_rows
    gate, up, w, bias, a, b = _mlp_inputs()
    seed, s = 99, 0.5
    plain = _SwigluDownLora.apply(gate, up, w, bias, a, b, s, p, seed, torch.float64)
    kept = _SwigluDownLora.apply(gate, up, w, bias, a, b, s, p, seed, torch.float64, True)
    assert torch.equal(kept, plain)
    gate_q = from_fp8_rows(*fp8_rows(gate), torch.float64).view(gate.shape).requires_grad_()
    up_q = from_fp8_rows(*fp8_rows(up), torch.float64).view(up.shape).requires_grad_()
    h = torch.nn.functional.silu(gate_q) * up_q
    hd = h * _mask_of(h.shape, h.dtype, h.device, p, seed) if p else h
    at_kept = torch.nn.functional.linear(h, w, bias) + s * (hd @ a.t()) @ b.t()
    got, want, exact = _grads(kept, (gate, up, a, b)), _grads(at_kept, (gate_q, up_q, a)), _grads(plain, (gate, b))
    for g_, w_ in zip(got[:3], want):
        assert torch.allclose(g_, w_, rtol=0, atol=1e-10)
    assert torch.allclose(got[3], exact[1], rtol=0, atol=1e-12)
    assert (got[0] - exact[0]).abs().max() > 1e-6  # the rounding is really there


def test_lean_mlp_fp8_model_keeps_a_quarter_of_gate_and_up_and_trains_nearly_alike(tiny_model_dir):
    """The tiny LoRA model with --lean_mlp_fp8 against --lean_mlp: the same loss (the forward is unchanged),
    per decoder layer gate and up kept as 1-byte values plus a float32 scale per token instead of 4-byte
    float32 values, and LoRA gradients within 2^-3 relative (L2) of the exact ones: the backward multiplies
    two kept values, each rounded by at most 2^-4 (measured: at most 0.034)."""
    from ocrtune.models.patches import PatchOptions, prepare
    batch = _sample_batch(tiny_model_dir)
    results = {}
    for fp8 in (False, True):
        model, _ = _lora_model(tiny_model_dir, True)
        prepare(model, PatchOptions(patch_embed=False, lean_mlp=True, lean_mlp_fp8=fp8))  # sets the float8 choice
        results[fp8] = _loss_grads_kept(model, batch)
    assert torch.equal(results[True][0], results[False][0])
    text = model.config.text_config
    tokens = batch["input_ids"].numel()
    per_layer = 2 * tokens * text.intermediate_size * (4 - 1) - 2 * tokens * 4  # values 4 -> 1 byte, plus scales
    assert results[False][2] - results[True][2] == text.num_hidden_layers * per_layer
    for k, g in results[False][1].items():
        if g.abs().sum() > 0:
            assert (results[True][1][k] - g).norm() <= 2 ** -3 * g.norm(), k


@pytest.mark.parametrize("flags,fp8", [({"lean_mlp": True}, False), ({"lean_mlp_fp8": True}, True)])
def test_lean_mlp_flags_reach_the_mlps(tiny_model_dir, flags, fp8):
    """`--lean_mlp_fp8` alone turns the lean MLP on, with gate/up kept in float8; `--lean_mlp` keeps them as they are."""
    from ocrtune.models.loading import load_model
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import prepare_model
    model = prepare_model(load_model(tiny_model_dir, torch.float32, "sdpa"), SftArgs(train_type="lora", **flags))
    mlps = [m for m in model.modules() if hasattr(m, "_ocrtune_lean_fp8")]
    assert len(mlps) == model.config.text_config.num_hidden_layers
    assert all(m._ocrtune_lean_fp8 is fp8 and hasattr(m, "_ocrtune_stock_forward") for m in mlps)


def test_dropout_calls_stay_out_of_compiled_graphs():
    """Each dropout call draws a new seed (a Python int): traced by torch.compile, every call would specialize on
    it and compile again (11 frames in 6 calls before). The seeded call runs eagerly: two frames, whatever the
    number of calls."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    x, res = torch.randn(16, 32, generator=g, requires_grad=True), torch.randn(16, 8, generator=g, requires_grad=True)
    a, b = torch.randn(4, 32, generator=g, requires_grad=True), torch.randn(8, 4, generator=g, requires_grad=True)
    gate, up = torch.randn(16, 24, generator=g, requires_grad=True), torch.randn(16, 24, generator=g, requires_grad=True)
    w, a2 = torch.randn(8, 24, generator=g), torch.randn(4, 24, generator=g, requires_grad=True)

    def step(res, x, a, b):
        out = lora_addmm(res * 2, x, a, b, 0.5, p=0.1) + swiglu_down_lora(gate * 1, up, w, None, a2, b, 0.5, p=0.1)
        return (out * 3).sum()

    counter = CompileCounter()
    compiled = torch.compile(step, backend=counter)
    for _ in range(6):
        compiled(res, x, a, b).backward()
    assert counter.frame_count <= 3, counter.frame_count
    torch._dynamo.reset()


def test_inplace_update_writes_the_base_output_and_keeps_the_gradients():
    """`inplace` (the patched LoRA layer over an nn.Linear or float8 base): the update goes into the base layer's
    output itself (no copy of it), with the out-of-place values and gradients; a leaf that needs a gradient is
    never written (autograd forbids it: the update then goes out of place)."""
    _, x, a, b = _inputs()
    w = torch.randn(D_OUT, D_IN, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    for p in (0.0, 0.3):
        torch.manual_seed(5)
        base = x @ w.t()
        ptr = base.data_ptr()
        out = lora_addmm(base, x, a, b, 0.5, p=p, inplace=True)
        assert out.data_ptr() == ptr
        torch.manual_seed(5)
        ref = lora_addmm(x @ w.t(), x, a, b, 0.5, p=p)
        assert torch.equal(out, ref)
        for got, want in zip(_grads(out, (x, a, b, w)), _grads(ref, (x, a, b, w))):
            assert torch.allclose(got, want, rtol=0, atol=1e-11)
    with torch.no_grad():  # evaluation and decoding: the base output takes the update too
        base = x @ w.t()
        out = lora_addmm(base, x, a, b, 0.5, inplace=True)
        assert out.data_ptr() == base.data_ptr() and torch.allclose(out, (x @ w.t()) + 0.5 * (x @ a.t()) @ b.t())
    leaf = torch.randn(2, T // 2, D_OUT, dtype=torch.float64, requires_grad=True)
    before = leaf.detach().clone()
    out = lora_addmm(leaf, x, a, b, 0.5, inplace=True)
    assert out.data_ptr() != leaf.data_ptr() and torch.equal(leaf.detach(), before)
    assert torch.allclose(_grads(out, (leaf,))[0], _grads(leaf * 1, (leaf,))[0])


def test_inplace_update_compiles_to_the_eager_gradients():
    """Compiled layers (--torch_compile, LoRA dropout 0) trace the in-place update (`mark_dirty`): the same loss and
    gradients as eager."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 32, generator=g, requires_grad=True)
    w = torch.randn(8, 32, generator=g)
    a, b = torch.randn(4, 32, generator=g, requires_grad=True), torch.randn(8, 4, generator=g, requires_grad=True)

    def step(x, a, b):
        return (lora_addmm(x @ w.t(), x, a, b, 0.5, inplace=True) * 3).sum()

    torch._dynamo.reset()
    eager = step(x, a, b)
    compiled = torch.compile(step)(x, a, b)
    assert torch.allclose(compiled, eager, rtol=1e-6)
    for got, want in zip(torch.autograd.grad(compiled, (x, a, b)), torch.autograd.grad(eager, (x, a, b))):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_inplace_update_of_a_biased_linear_goes_through_no_view():
    """nn.Linear with a bias returns its rows viewed as 3-D: the update is written into that storage without the
    view's bookkeeping (autograd would replay it on the base in backward, and torch.compile failed on it), with the
    out-of-place gradients, eager and compiled."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(32, 8).requires_grad_(False)
    x = torch.randn(2, 5, 32, generator=g, requires_grad=True)
    a, b = torch.randn(4, 32, generator=g, requires_grad=True), torch.randn(8, 4, generator=g, requires_grad=True)
    assert lin(x)._base is not None  # the case this covers

    def step(x, a, b, inplace=True):
        return lora_addmm(lin(x), x, a, b, 0.5, inplace=inplace)

    out = step(x, a, b)
    assert type(out.grad_fn).__name__ == "_LoraAddmmBackward"
    ref = step(x, a, b, inplace=False)
    w = torch.linspace(-1, 1, out.numel()).view(out.shape)
    want = torch.autograd.grad((ref * w).sum(), (x, a, b))
    torch._dynamo.reset()
    for fn in (step, torch.compile(step)):
        got = torch.autograd.grad((fn(x, a, b) * w).sum(), (x, a, b))
        for p, q in zip(got, want):
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
