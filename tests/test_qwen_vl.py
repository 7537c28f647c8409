"""models/patches/: the one place ocrtune reaches into transformers/PEFT internals.

`prepare` reports what it applied; outside the tested versions it warns once and the model runs its stock
forward (same loss as an unpatched model, within float32 rounding); every private name `PATCH_POINTS`
relies on exists in the installed transformers/PEFT."""
from __future__ import annotations

import importlib
import inspect
import warnings

import pytest
import torch

from ocrtune.data.registry import SAMPLE_DIR
from ocrtune.models.patches import PatchOptions, common, forward, liger, lora, prepare, versions, vision
from ocrtune.models.patches.versions import PATCH_POINTS, TESTED
from ocrtune.models.template import Template, collate
from ocrtune.train.data import EncodedDataset, parquet_rows
from ocrtune.train.loss import ResponseLoss
from tolerance import float32_atol, matmul_stages


@pytest.fixture(scope="module")
def encoded(tiny_model_dir):
    from ocrtune.models.loading import load_processor
    ds = EncodedDataset(parquet_rows(SAMPLE_DIR / "train.parquet", limit=4), Template(load_processor(tiny_model_dir), "qwen2_vl", 2048))
    return [ds[i] for i in range(len(ds))]


def _stock(tiny_model_dir):
    """The model as plain transformers builds it: no ocrtune patch at all."""
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def _lora(model, patch_embed=False, **kw):
    from peft import LoraConfig, get_peft_model

    from ocrtune.compat import enable_activation_checkpointing, quiet_peft_deprecations

    from ocrtune.models.loading import lora_target_regex
    model.requires_grad_(False)
    targets = lora_target_regex(model, ["all-linear"])
    if patch_embed:  # the patch embedding's Conv3d too (PEFT's LoRA Conv3d, as the from-scratch recipe has it)
        targets = f"({targets})|(.*patch_embed\\.proj)"
    with quiet_peft_deprecations():
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    enable_activation_checkpointing(model)
    return model


def test_installed_versions_are_the_tested_ones():
    assert versions.checked_versions() is None
    assert {p.package for p in PATCH_POINTS} <= set(TESTED)
    assert len({p.name for p in PATCH_POINTS}) == len(PATCH_POINTS)


def test_prepare_reports_what_it_applied(tiny_model_dir):
    model = _stock(tiny_model_dir)
    applied = prepare(model, PatchOptions())  # what load_model applies: the patch-embed GEMM only
    assert applied == {"patch_embed": 1, "fused_lora": 0, "recompute": None, "vision_varlen": False,
                       "sdpa_varlen": False, "skipped": {}}
    assert hasattr(model.model.visual.patch_embed, "_ocrtune_stock_forward")
    model = _lora(model)
    n_lora = sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in model.modules())
    options = PatchOptions(fused_lora=True, packing=True, recompute_layers=1, vision_varlen=True)
    applied = prepare(model, options)
    assert applied == {"patch_embed": 0, "fused_lora": n_lora, "recompute": 1, "vision_varlen": True,
                       "sdpa_varlen": True, "skipped": {}}
    assert n_lora > 0
    layers = common.causal_lm(model).model.language_model.layers
    assert [layer.gradient_checkpointing for layer in layers] == [True] + [False] * (len(layers) - 1)
    attn = common.causal_lm(model).model.visual.blocks[0].attn
    assert hasattr(attn, "_ocrtune_stock_forward")
    again = prepare(model, options)  # idempotent: nothing is patched twice
    assert again["fused_lora"] == 0 and again["patch_embed"] == 0 and again["vision_varlen"] is True


def test_prepare_model_applies_the_training_patches(tiny_model_dir):
    from ocrtune.models.loading import load_model
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import prepare_model
    model = prepare_model(load_model(tiny_model_dir, torch.float32, "sdpa"),
                          SftArgs(gradient_checkpointing=True, recompute_layers=1))
    assert any(hasattr(m, "_ocrtune_stock_forward") and hasattr(m, "lora_A") for m in model.modules())  # fused LoRA
    assert common.causal_lm(model).model.visual._ocrtune_varlen is True
    assert [layer.gradient_checkpointing for layer in common.causal_lm(model).model.language_model.layers][1:] \
        == [False] * (len(common.causal_lm(model).model.language_model.layers) - 1)


def _version_warnings(caught):
    return [w for w in caught if "fast paths were checked against" in str(w.message)]


def test_untested_transformers_warns_once_and_runs_stock_forward(tiny_model_dir, encoded, monkeypatch):
    import transformers

    from ocrtune.data.packing import pack
    from ocrtune.models.loading import load_model
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    monkeypatch.setattr(versions, "_WARNED", set())
    reason = versions.checked_versions()
    assert reason is not None and "transformers 5.17–5.24; found 5.99.0" in reason
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_model(tiny_model_dir, torch.float32, "sdpa").eval()  # prepare(model, PatchOptions())
        applied = prepare(model, PatchOptions(packing=True, vision_varlen=True, recompute_layers=1))
    assert len(_version_warnings(caught)) == 1
    assert {"patch_embed", "vision_varlen", "sdpa_varlen", "packed_forward", "recompute"} <= set(applied["skipped"])
    assert "fused_lora" not in applied["skipped"]  # peft is inside its range
    assert applied["patch_embed"] == 0 and applied["vision_varlen"] is False and applied["sdpa_varlen"] is False
    assert not any(hasattr(m, "_ocrtune_stock_forward") for m in model.modules())

    def hand_rolled(*a, **k):
        raise AssertionError("the hand-rolled Qwen2VLModel forward ran outside the tested versions")
    monkeypatch.setattr(forward, "image_embeds", hand_rolled)
    padded = collate(encoded, 0)
    stock = _stock(tiny_model_dir)
    stock.load_state_dict(model.state_dict())
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        ref = stock(**padded)
        loss, n, _ = ResponseLoss(model)(**padded)
        loss_packed, n_packed, _ = ResponseLoss(model)(**pack(encoded, 0))
    assert not _version_warnings(caught)  # the one warning was at load
    # the mean token cross-entropy moves by at most twice the largest logit error (d CE / d logit is
    # softmax - onehot), and the logits of two float32 evaluations differ by the rounding of the
    # language model's depth and width (tests/tolerance.py)
    depth, width = matmul_stages(stock.config)
    atol = 2 * float32_atol(ref.logits, depth, width)
    assert int(n) == int(n_packed) > 0
    torch.testing.assert_close(loss / n, ref.loss, rtol=0, atol=atol)
    torch.testing.assert_close(loss_packed / n_packed, ref.loss, rtol=0, atol=atol)


def test_untested_peft_leaves_lora_layers_alone(tiny_model_dir, monkeypatch):
    import peft
    model = _lora(_stock(tiny_model_dir))
    monkeypatch.setattr(peft, "__version__", "0.30.0")
    monkeypatch.setattr(versions, "_WARNED", set())
    with pytest.warns(UserWarning, match="checked against peft 0.21–0.21; found 0.30.0"):
        applied = prepare(model, PatchOptions(fused_lora=True))
    assert applied["fused_lora"] == 0 and {"fused_lora", "lora_input_upcast"} <= set(applied["skipped"])
    assert lora.disable_lora_input_upcast(model) == 0
    assert all(m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled"))


def test_patch_points_resolve(tiny_model_dir):
    """Every private name a patch point relies on exists in the installed transformers/PEFT, on a
    model that holds every patched kind of module (LoRA layers, checkpointed decoder layers, ViT)."""
    model = _lora(_stock(tiny_model_dir), patch_embed=True)
    assert versions.unresolved(model) == []
    for point in PATCH_POINTS:
        for ref in point.relies_on:
            module_name, _, rest = ref.partition(":")
            if "#" not in rest or importlib.util.find_spec(module_name.split(".")[0]) is None:
                continue
            cls = getattr(importlib.import_module(module_name), rest.split("#")[0])
            assert any(isinstance(m, cls) for m in model.modules()), f"{point.name}: no {cls.__name__} in the model to check {ref}"


@pytest.mark.parametrize("ref", [
    "transformers.modeling_utils:AttentionInterface.no_such_method",
    "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLModel.get_rope_index(input_ids, no_such_param)",
    "transformers.models.qwen2_vl.modeling_qwen2_vl:VisionAttention#no_such_attr",
    "transformers.no_such_module:Name",
])
def test_resolver_reports_missing_names(tiny_model_dir, ref):
    model = _stock(tiny_model_dir) if "#" in ref else None
    assert versions._resolve(ref, model) is not None


def test_prepare_liger_where_it_cannot_run_leaves_the_model_stock(tiny_model_dir, encoded):
    """`PatchOptions(liger=True)` here (no CUDA, no liger-kernel): one warning, the reason in `skipped`,
    no fused CE, and outputs bit-identical to the stock model's."""
    reason = liger.liger_unavailable_reason()
    if reason is None:
        pytest.skip("Liger can run here: tests/test_cuda.py checks it")
    model, stock = _stock(tiny_model_dir), _stock(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = prepare(model, PatchOptions(patch_embed=False, liger=True))
    assert [str(w.message) for w in caught if "liger" in str(w.message).lower()] == \
        [f"--use_liger: {reason}; using the standard kernels"]
    assert applied["liger"] is False and applied["fused_ce"] is None and applied["skipped"] == {"liger": reason}
    assert not any(hasattr(m, "_ocrtune_stock_forward") or hasattr(m, "_ocrtune_liger") for m in model.modules())
    batch = {k: v for k, v in collate(encoded, 0).items() if k != "labels"}
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, stock(**batch).logits)


def test_prepare_liger_patches_the_unwrapped_model_once(tiny_model_dir, monkeypatch):
    """Where Liger can run (faked: CUDA reported, a stand-in liger_kernel), prepare calls Liger's
    patch once on the *ForConditionalGeneration, also when asked again after the LoRA wrap, and hands
    back the fused linear CE (reduction "sum") for the loss."""
    import sys
    import types

    calls = []

    class FusedCE:  # stands in for LigerFusedLinearCrossEntropyLoss
        def __init__(self, reduction):
            self.reduction = reduction

        def __call__(self, weight, hidden, targets):
            return torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction=self.reduction)

    lt = types.ModuleType("liger_kernel.transformers")
    lt.apply_liger_kernel_to_qwen2_vl = lambda **kw: calls.append(kw)
    lt.LigerFusedLinearCrossEntropyLoss = FusedCE
    rope = types.ModuleType("liger_kernel.transformers.rope")
    rope.liger_rotary_pos_emb = lambda q, k, cos, sin, *a, **kw: (q, k)
    rope.liger_rotary_pos_emb_vision = lambda q, k, cos, sin: (q, k)
    pkg = types.ModuleType("liger_kernel")
    pkg.transformers, lt.rope = lt, rope
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", lt)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.rope", rope)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    import transformers.models.qwen2_vl.modeling_qwen2_vl as q2
    for name in ("apply_rotary_pos_emb", "apply_rotary_pos_emb_vision"):  # restored after the test
        monkeypatch.setattr(q2, name, getattr(q2, name))
    model = _stock(tiny_model_dir)
    applied = prepare(model, PatchOptions(patch_embed=False, liger=True))
    assert applied["liger"] is True and applied["skipped"] == {} and len(calls) == 1
    assert calls[0]["model"] is model and calls[0]["fused_linear_cross_entropy"] is False  # the loss is ResponseLoss's
    # transformers 5 rotates with the plain apply_rotary_pos_emb (M-RoPE folded into cos/sin): Liger's plain kernels
    assert "apply_multimodal_rotary_pos_emb" not in inspect.getsource(q2.Qwen2VLAttention.forward)
    stock = q2.apply_rotary_pos_emb.__wrapped__
    assert q2.apply_rotary_pos_emb._ocrtune_liger and q2.apply_rotary_pos_emb_vision._ocrtune_liger
    assert liger.folded_mrope_rope("qwen2_vl") and q2.apply_rotary_pos_emb.__wrapped__ is stock  # wrapped once
    # off CUDA (the patch is process-wide) the stock RoPE runs, not the kernel (this stand-in returns q, k as they are)
    q, k, cos, sin = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    for got, want in zip(q2.apply_rotary_pos_emb(q, k, cos, sin), stock(q, k, cos, sin)):
        assert torch.equal(got, want) and not torch.equal(got, q if got.shape == q.shape else k)
    w, h, t = torch.randn(7, 4), torch.randn(5, 4), torch.tensor([0, 6, 2, 2, 1])
    torch.testing.assert_close(applied["fused_ce"](w, h, t), torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum"))
    again = prepare(_lora(model), PatchOptions(patch_embed=False, liger=True))
    assert again["liger"] is True and len(calls) == 1  # idempotent: the wrapped model's base is not patched twice


@pytest.mark.parametrize("grid", [[[1, 4, 6], [1, 8, 2], [1, 4, 6]], [[2, 6, 4], [1, 2, 2], [3, 4, 4]]])
def test_vision_host_kwargs_are_what_transformers_builds(grid):
    """The ViT's position ids and attention boundaries made on the host equal, value and dtype, what the vision
    forward builds image by image on the device (videos, t > 1, included)."""
    from transformers import vision_utils
    want_pos = vision_utils.get_vision_position_ids(torch.tensor(grid), 2)
    want_cu = vision_utils.get_vision_cu_seqlens(torch.tensor(grid))
    got = vision.vision_host_kwargs(grid, 2, "cpu")
    assert got["position_ids"].dtype == want_pos.dtype and torch.equal(got["position_ids"], want_pos)
    assert got["cu_seqlens"].dtype == want_cu.dtype and torch.equal(got["cu_seqlens"], want_cu)


def test_image_embeds_take_the_host_positions_and_match_the_stock_ones(tiny_model_dir, encoded, monkeypatch):
    """The packed forward hands the ViT its host-made position ids (the vision forward finds them in its kwargs
    rather than building them: fails if a transformers release stops reading them) with the same image features,
    bit for bit, as the stock path."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl

    from ocrtune.data.packing import pack
    from ocrtune.models.loading import load_model
    lm = common.causal_lm(load_model(tiny_model_dir, torch.float32, "sdpa").eval())
    batch = pack(encoded, 0)
    assert len(batch["image_grid_thw"]) == len(encoded) > 1
    stock_ids, handed = modeling_qwen2_vl.get_vision_position_ids, []

    def spy(grid_thw, spatial_merge_size, *a, kwargs=None, **k):
        handed.append(kwargs is not None and kwargs.get("position_ids") is not None)
        return stock_ids(grid_thw, spatial_merge_size, *a, kwargs=kwargs, **k)
    monkeypatch.setattr(modeling_qwen2_vl, "get_vision_position_ids", spy)
    args = (lm, lm.model, batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    with torch.no_grad():
        ours = forward.image_embeds(*args)
        from ocrtune.models.patches import PatchOptions, prepare
        assert prepare(lm, PatchOptions(patch_embed=False, host_vision_ids=False))["host_vision_ids"] is False
        stock = forward.image_embeds(*args)
    assert handed == [True, False]
    assert torch.equal(ours, stock)


def test_packing_selects_its_own_attention_and_leaves_sdpa_alone(tiny_model_dir, encoded, monkeypatch):
    """`prepare(packing=True)` selects "ocrtune_varlen" on the text config; transformers' "sdpa" stays stock for
    every other model. Packed rows then run the packed attention, with the padded batch's loss; a model loaded
    without it gets the same loss from transformers' document mask, without the packed attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ocrtune.data.packing import pack
    from ocrtune.models.loading import load_model
    from ocrtune.models.patches import attention
    calls = []
    real = attention.packed_attention
    monkeypatch.setattr(attention, "packed_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    padded, packed = collate(encoded, 0), pack(encoded, 0)
    losses = {}
    for packing in (True, False):
        model = load_model(tiny_model_dir, torch.float32, "sdpa").eval()
        applied = prepare(model, PatchOptions(patch_embed=False, packing=packing))
        text = common.causal_lm(model).model.language_model
        assert applied["sdpa_varlen"] is packing
        assert text.config._attn_implementation == ("ocrtune_varlen" if packing else "sdpa")
        with torch.no_grad():
            loss, n, _ = ResponseLoss(model)(**padded)
            before = len(calls)
            loss_packed, n_packed, _ = ResponseLoss(model)(**packed)
        assert (len(calls) > before) is packing  # one call a decoder layer with the varlen attention
        torch.testing.assert_close(loss_packed / n_packed, loss / n, rtol=1e-5, atol=1e-6)
        losses[packing] = loss_packed
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def test_forwards_refuse_a_model_prepare_never_saw(tiny_model_dir, encoded):
    """The packed forward patches nothing itself: a model built without `prepare` is refused with one clear
    message instead of running without its patches."""
    model = _stock(tiny_model_dir)
    with pytest.raises(RuntimeError, match="was not prepared: load it with ocrtune.models.loading.load_model"):
        ResponseLoss(model)(**collate(encoded[:1], 0))
    prepare(model, PatchOptions(patch_embed=False))
    with torch.no_grad():
        loss, n, _ = ResponseLoss(model)(**collate(encoded[:1], 0))
    assert int(n) > 0 and torch.isfinite(loss)


def test_lora_input_upcast_is_switched_off_by_prepare_not_by_the_loss(tiny_model_dir, encoded):
    """bf16 model, float32 LoRA weights: the loss autocasts to bf16 but leaves PEFT's flags as they are;
    `prepare(lora_autocast=True)` switches the upcast off on every LoRA layer (and on a float32 model, nothing)."""
    from ocrtune.models.loading import load_model
    model = _lora(load_model(tiny_model_dir, torch.bfloat16, "sdpa"))
    flags = lambda m: [x.cast_input_dtype_enabled for x in m.modules() if hasattr(x, "cast_input_dtype_enabled")]  # noqa: E731
    loss_fn = ResponseLoss(model)
    with torch.no_grad():
        loss_fn(**collate(encoded[:1], 0))
    assert loss_fn._amp == torch.bfloat16 and flags(model) and all(flags(model))
    applied = prepare(model, PatchOptions(patch_embed=False, lora_autocast=True))
    assert applied["lora_input_upcast"] == len(flags(model)) and not any(flags(model))
    model32 = _lora(load_model(tiny_model_dir, torch.float32, "sdpa"))
    assert prepare(model32, PatchOptions(patch_embed=False, lora_autocast=True))["lora_input_upcast"] == 0
    assert all(flags(model32))


@pytest.mark.parametrize("version,rewritten", [("1.16.0", True), ("1.99.0", False)])
def test_fsdp_on_cpu_rewrites_accelerate_state_only_on_checked_versions(monkeypatch, version, rewritten):
    """accelerate's shared distributed type is set to FSDP on a multi-process CPU run only where accelerate is
    the version it was checked against; elsewhere one warning and the state as accelerate made it."""
    import types

    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from ocrtune.train.distributed import fsdp_on_cpu
    monkeypatch.setattr(accelerate, "__version__", version)
    monkeypatch.setattr(versions, "_WARNED", set())
    shared = {"distributed_type": DistributedType.MULTI_CPU}
    monkeypatch.setattr(PartialState, "_shared_state", shared)
    state = types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, fsdp_plugin=None)
    acc = types.SimpleNamespace(device=torch.device("cpu"), num_processes=2, distributed_type=DistributedType.MULTI_CPU,
                                state=state)
    plugin = object()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fsdp_on_cpu(acc, {"fsdp_plugin": plugin})
    want = DistributedType.FSDP if rewritten else DistributedType.MULTI_CPU
    assert shared["distributed_type"] == state.distributed_type == want
    assert (state.fsdp_plugin is plugin) is rewritten
    assert [str(w.message) for w in caught if "accelerate" in str(w.message)] == ([] if rewritten else [
        "ocrtune's fast paths were checked against accelerate 1.15–1.16; found 1.99.0: --fsdp on CPU runs as plain "
        "multi-process training"])
