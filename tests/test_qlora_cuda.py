"""QLoRA on CUDA (run with `pytest -m cuda tests/test_qlora_cuda.py`; bench/qlora_gpu_call.sh does): the 4-bit base
on the GPU, ocrtune's fused LoRA over it against PEFT's forward in bf16, and a short packed sft run whose adapter
plain PEFT loads over a bitsandbytes base."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU checks)"),
              pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")]


def test_fused_lora_over_cuda_4bit_base_matches_peft(tiny_model_dir):
    from peft import LoraConfig
    from peft.tuners.lora import bnb as lora_bnb

    from ocrtune.models.loading import load_model
    from ocrtune.models.patches.lora import fuse_lora_linears
    model = load_model(tiny_model_dir, torch.bfloat16, device=torch.device("cuda"), quant_bits=4)
    base = model.model.language_model.layers[0].self_attn.q_proj
    torch.manual_seed(0)
    layer = lora_bnb.Linear4bit(base, "default", config=LoraConfig(r=8, lora_alpha=32), r=8, lora_alpha=32,
                                lora_dropout=0.0, init_lora_weights=False).cuda()
    x = torch.randn(3, 64, base.in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        ref = layer(x)
    ref.float().square().sum().backward()
    want = [x.grad.clone(), layer.lora_A["default"].weight.grad.clone()]
    assert fuse_lora_linears(torch.nn.Sequential(layer)) == 1
    x.grad = None
    layer.zero_grad()
    with torch.autocast("cuda", torch.bfloat16):
        out = layer(x)
    out.float().square().sum().backward()
    # one bf16 rounding apart (PEFT adds in separate kernels, the fused path in the GEMM's epilogue)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    for got, w in zip([x.grad, layer.lora_A["default"].weight.grad], want):
        torch.testing.assert_close(got.float(), w.float(), rtol=5e-2, atol=5e-2)


def test_qlora_sft_on_cuda_trains_and_saves_a_plain_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from ocrtune.models.quant import bnb_config, model_quant_bits
    from ocrtune.train.args import SftArgs
    from ocrtune.train.data import rows_data
    from ocrtune.train.trainer import SftRun
    from tests.samples import sample_rows
    run = SftRun(SftArgs(model=str(tiny_model_dir), train_type="qlora", max_steps=4, batch_size=4, packing=True,
                         eval_steps=100, save_steps=4, dataset_test_ratio=0, report_to=["none"],
                         output_dir=str(tmp_path), use_liger=False), data=rows_data(sample_rows(8)))
    assert model_quant_bits(run.model) == 4 and run.args.quant_bits == 4
    out = run.train()
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, quantization_config=bnb_config(4),
                                                       device_map={"": "cuda"})
    model = PeftModel.from_pretrained(base, out["last_model_checkpoint"])
    assert model_quant_bits(model) == 4
    assert Path(out["last_model_checkpoint"], "adapter_model.safetensors").exists()
