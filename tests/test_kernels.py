"""The faster forwards compute what the stock ones do: fused LoRA, linear patch embedding,
partial recompute. Each compares outputs and gradients against the unpatched module."""
from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model

from ocrtune.models.patches.vision import linear_patch_embed
from tolerance import float32_atol
from ocrtune.models.patches.lora import fuse_lora_linears
from ocrtune.models.patches.blocks import limit_recompute


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 48), nn.Linear(48, 16, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _lora(dora=False, dropout=0.0):
    torch.manual_seed(0)
    model = get_peft_model(TwoLinears(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["up", "down"],
                                                    use_dora=dora))
    for name, p in model.named_parameters():  # LoRA B starts at zero: give it values so the branch counts
        if "lora_B" in name:
            nn.init.normal_(p, std=0.5)
    return model


def _run(model, x, seed=0):
    torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_fused_lora_matches_peft():
    stock = _lora()
    fused = copy.deepcopy(stock)
    assert fuse_lora_linears(fused) == 2
    assert fuse_lora_linears(fused) == 0  # idempotent
    x = torch.randn(2, 5, 16)
    out_s, grads_s = _run(stock, x)
    out_f, grads_f = _run(fused, x)
    torch.testing.assert_close(out_f, out_s, rtol=1e-5, atol=1e-5)
    assert grads_s.keys() == grads_f.keys() and any("lora_A" in n for n in grads_s)
    for name in grads_s:
        torch.testing.assert_close(grads_f[name], grads_s[name], rtol=1e-4, atol=1e-5, msg=name)
    # the LoRA branch contributes: disabling adapters changes the output
    with fused.disable_adapter():
        assert not torch.allclose(fused(x), out_f, atol=1e-3)


def test_fused_lora_dropout_is_seeded_and_active():
    """The fused path draws its own masks (regenerated in backward; equality with PEFT under the same mask is
    tests/test_lora_addmm.py): the same seed gives the same step, and dropout changes the result."""
    fused = _lora(dropout=0.3)
    fuse_lora_linears(fused)
    x = torch.randn(2, 5, 16)
    out1, g1 = _run(fused, x, seed=3)
    fused.zero_grad()
    out2, g2 = _run(fused, x, seed=3)
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=0, atol=0, msg=name)
    fused.eval()  # dropout off
    assert not torch.allclose(fused(x), out1, atol=1e-3)


def test_fused_lora_under_bf16_autocast_is_close():
    stock = _lora()
    fused = copy.deepcopy(stock)
    fuse_lora_linears(fused)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = stock(x), fused(x)
    assert b.dtype == a.dtype == torch.bfloat16
    torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)


def test_fused_lora_leaves_dora_to_peft():
    stock = _lora(dora=True)
    fused = copy.deepcopy(stock)
    fuse_lora_linears(fused)  # patched, but DoRA layers take PEFT's own forward
    x = torch.randn(3, 16)
    torch.testing.assert_close(fused(x), stock(x))


def test_linear_patch_embed_matches_conv3d(tiny_model_dir):
    from transformers import AutoModelForImageTextToText
    torch.manual_seed(0)
    stock = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)  # plain transformers: the Conv3d
    fast = copy.deepcopy(stock)
    assert linear_patch_embed(fast) == 1 and linear_patch_embed(fast) == 0
    pe_s, pe_f = stock.model.visual.patch_embed, fast.model.visual.patch_embed
    pixels = torch.randn(12, pe_s.in_channels * pe_s.temporal_patch_size * pe_s.patch_size ** 2)
    out_s, out_f = pe_s(pixels), pe_f(pixels)
    torch.testing.assert_close(out_f, out_s, rtol=1e-5, atol=1e-5)
    out_s.sum().backward()
    out_f.sum().backward()
    torch.testing.assert_close(pe_f.proj.weight.grad, pe_s.proj.weight.grad, rtol=1e-5, atol=1e-5)
    assert set(fast.state_dict()) == set(stock.state_dict())  # same parameter names: checkpoints unchanged


def test_lora_on_the_patch_embedding_trains_through_the_linear_patch_embed(tiny_model_dir):
    """LoRA on the vision tower's `proj` modules (the from-scratch recipe's targets) also wraps patch_embed.proj, a
    Conv3d, after the load patched its forward: the patched forward must run the adapter (it read `.weight` and
    skipped it, so the patch embedding's LoRA never trained), and give what transformers' own forward gives."""
    from ocrtune.models.loading import load_model
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import prepare_model
    torch.manual_seed(0)
    model = prepare_model(load_model(tiny_model_dir, torch.float32), SftArgs(
        target_modules=["qkv", "proj", "fc1", "fc2"], freeze_vit=False, lora_dropout=0.0, gradient_checkpointing=False))
    pe = model.base_model.model.model.visual.patch_embed
    assert hasattr(pe, "_ocrtune_stock_forward") and hasattr(pe.proj, "base_layer")  # patched, then wrapped
    with torch.no_grad():
        for name, p in pe.proj.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    pixels = torch.randn(12, pe.in_channels * pe.temporal_patch_size * pe.patch_size ** 2)
    out = pe(pixels)
    with model.disable_adapter():
        base = pe(pixels)
    assert (out - base).abs().max() > 1e-3  # the adapter takes part
    stock = pe._ocrtune_stock_forward(pixels)  # transformers' forward: PEFT's LoRA conv
    torch.testing.assert_close(out, stock)
    weights = [p for n, p in pe.proj.named_parameters() if "lora_" in n]
    g_stock = torch.autograd.grad(stock.square().sum(), weights)
    g_fast = torch.autograd.grad(out.square().sum(), weights)
    assert all(g.abs().sum() > 0 for g in g_fast)
    width = pixels.shape[1]  # the longest dot product: a flattened patch against a row of A
    for a, b in zip(g_fast, g_stock):  # the adapter's gradients as the conv path gives them, to float32 rounding
        # of three matmul stages (A, B, the loss's backward through both)
        assert (a - b).abs().max() <= float32_atol(b, depth=3, width=width)
    # the adapter runs as GEMMs on the flattened patches, not as convolutions
    with mock.patch.object(torch.nn.functional, "conv3d", side_effect=AssertionError("conv3d called")):
        torch.testing.assert_close(pe(pixels), out)


def test_ocrtune_load_model_uses_linear_patch_embed(tiny_model_dir):
    from ocrtune.models.loading import load_model
    model = load_model(tiny_model_dir, torch.float32)
    assert hasattr(model.model.visual.patch_embed, "_ocrtune_stock_forward")


def test_limit_recompute_keeps_loss_and_grads(tiny_model_dir):
    from ocrtune.models.loading import load_model
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, torch.float32)
    from ocrtune.compat import enable_activation_checkpointing
    enable_activation_checkpointing(model)
    model.train()
    ids = torch.randint(10, 500, (2, 12))
    def grads():
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    full = grads()
    layers = model.model.language_model.layers
    assert limit_recompute(model, 1) == 1
    assert [layer.gradient_checkpointing for layer in layers] == [True] + [False] * (len(layers) - 1)
    part = grads()
    assert full.keys() == part.keys()
    for name in full:
        torch.testing.assert_close(part[name], full[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_lora_bf16_error_is_rounding_only():
    """Under bf16 autocast (how training runs LoRA on a bf16 model) the fused path is as close to a
    float32 reference as PEFT's own forward: its difference from PEFT is rounding, not other math."""
    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
    ref = get_peft_model(big, LoraConfig(r=8, lora_alpha=32, target_modules=["0", "2"]))
    for name, p in ref.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.05)
    x = torch.randn(64, 256)
    _, g_ref = _run(ref, x)
    errors = {}
    for fused in (False, True):
        model = copy.deepcopy(ref)
        model.zero_grad()
        if fused:
            fuse_lora_linears(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, grads = _run(model, x)
        errors[fused] = max(((grads[n] - g_ref[n]).norm() / g_ref[n].norm()).item() for n in g_ref)
    assert 0 < errors[True] < 0.05
    assert errors[True] <= 1.5 * errors[False]
