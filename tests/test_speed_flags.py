"""Each speed flag falls back cleanly where its kernel is unavailable (CPU, package missing)."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from ocrtune.models.patches import liger


def _tiny(tiny_model_dir):
    from ocrtune.models.loading import load_model
    return load_model(tiny_model_dir, torch.float32, "sdpa")


def test_liger_falls_back_without_cuda(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _tiny(tiny_model_dir)
    before = {n: type(m) for n, m in model.named_modules()}
    forwards = {n: m.forward for n, m in model.named_modules()}
    with pytest.warns(UserWarning, match="no CUDA device"):
        assert liger.apply_liger(model) is False
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert all(m.forward == forwards[n] for n, m in model.named_modules())
    with pytest.warns(UserWarning, match="no CUDA device"):
        assert liger.liger_fused_ce() is None


def test_liger_falls_back_when_not_installed(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    model = _tiny(tiny_model_dir)
    with pytest.warns(UserWarning, match="liger-kernel is not usable"):
        assert liger.apply_liger(model) is False
    with pytest.warns(UserWarning, match="liger-kernel is not usable"):
        assert liger.liger_fused_ce() is None


def test_packed_attention_cpu_fallback_is_exact():
    """On CPU the packed attention is sdpa with a block-diagonal causal mask: equal to running
    each sample on its own."""
    from ocrtune.models.patches.attention import packed_attention
    torch.manual_seed(0)
    lens = [3, 5, 2]
    q = torch.randn(1, 4, sum(lens), 8)
    k, v = torch.randn(1, 2, sum(lens), 8), torch.randn(1, 2, sum(lens), 8)
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning on CPU: the fallback is the CPU path
        out = packed_attention(None, q, k, v, cu, max(lens), scaling=None)
    assert out.shape == (1, sum(lens), 4, 8)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, s:e], k[:, :, s:e].repeat_interleave(2, 1), v[:, :, s:e].repeat_interleave(2, 1), is_causal=True)
        torch.testing.assert_close(out[:, s:e], ref.transpose(1, 2))


def test_varlen_sdpa_wrapper_leaves_plain_sdpa_alone():
    """"ocrtune_varlen" without packed kwargs is transformers' sdpa; "sdpa" itself is not replaced."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ocrtune.models.patches.attention import VARLEN_ATTENTION, register_varlen_attention
    assert register_varlen_attention() is True
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_attention_forward
    fn = ALL_ATTENTION_FUNCTIONS[VARLEN_ATTENTION]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 1
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    out, _ = fn(module, q, k, v, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_sft_with_speed_flags_on_cpu(tiny_model_dir, tmp_path):
    """`--packing --packing_tokens --use_liger` train end to end on CPU (Liger falls back)."""
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import run_sft
    args = SftArgs(model=str(tiny_model_dir), dataset=["latex-ocr-sample#24"], max_steps=2, batch_size=4,
                   packing=True, packing_tokens=400, use_liger=True, eval_steps=2, logging_steps=1,
                   output_dir=str(tmp_path), report_to=["none"], dataset_test_ratio=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run_sft(args)
    assert out["global_step"] == 2


def test_varlen_kernel_dtype_follows_autocast():
    """With float32 master weights under bf16 autocast, the rotary step hands float32 q/k to the
    packed attention; it must still run the half-precision varlen kernel (as autocast would run
    sdpa), not the dense [T, T] mask fallback."""
    from ocrtune.models.patches.attention import varlen_dtype
    q = torch.randn(1, 2, 4, 8)
    assert varlen_dtype(q) is None  # plain float32: no half kernel
    assert varlen_dtype(q.bfloat16()) == torch.bfloat16
    assert varlen_dtype(q.half()) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert varlen_dtype(q) == torch.bfloat16


def test_liger_auto_is_off_for_narrow_models(tmp_path, tiny_model_dir, monkeypatch):
    """--use_liger's default where Liger can run: on for Qwen2-VL-2B's width and up, off for models narrower than
    1024 (the small preset's step was 0.276 s with Liger against 0.205 without on an H200); an explicit flag wins."""
    import json

    from ocrtune.models.patches import liger
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import ResolvedRun
    monkeypatch.setattr(liger, "liger_unavailable_reason", lambda: None)  # as on a GPU with liger-kernel
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 1536}}))
    assert ResolvedRun.of(SftArgs(), None, wide).use_liger is True
    assert ResolvedRun.of(SftArgs(), None, tiny_model_dir).use_liger is False  # hidden size 128
    assert ResolvedRun.of(SftArgs(use_liger=True), None, tiny_model_dir).use_liger is True
    monkeypatch.setattr(liger, "liger_unavailable_reason", lambda: "no CUDA device")
    assert ResolvedRun.of(SftArgs(), None, wide).use_liger is False


def test_torch_compile_trains_as_eager_does(tiny_model_dir, tmp_path):
    """--torch_compile compiles the decoder layers and ViT blocks in place: the same first loss as eager (inductor
    only reorders float32 sums), losses that stay close over the next steps, an eager evaluation, and a checkpoint
    with the same tensor names and shapes."""
    import json

    from safetensors.torch import load_file

    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import run_sft

    def run(compiled: bool) -> tuple[list[dict], dict]:
        out = tmp_path / ("compiled" if compiled else "eager")
        args = SftArgs(model=str(tiny_model_dir), dataset=["latex-ocr-sample#20"], max_steps=4, batch_size=4,
                       packing=True, learning_rate=1e-3, warmup_steps=0, eval_steps=4, logging_steps=1,
                       torch_compile=compiled, output_dir=str(out), add_output_dir_suffix=False, report_to=["none"],
                       dataset_test_ratio=0.2, dataloader_num_workers=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run_sft(args)
        logs = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
        return logs, load_file(str(out / "checkpoint-4" / "adapter_model.safetensors"))

    (eager, eager_ckpt), (comp, comp_ckpt) = run(False), run(True)
    losses = [[x["loss"] for x in logs if "loss" in x] for logs in (eager, comp)]
    evals = [[x["eval_loss"] for x in logs if "eval_loss" in x] for logs in (eager, comp)]
    assert len(losses[0]) == len(losses[1]) == 4 and len(evals[0]) == len(evals[1]) == 1
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3) and evals[1] == pytest.approx(evals[0], rel=1e-3)
    assert {k: v.shape for k, v in comp_ckpt.items()} == {k: v.shape for k, v in eager_ckpt.items()}


def test_speed_max_takes_what_applies_and_keeps_given_flags(monkeypatch):
    """--speed max: on a GPU with float8 tensor cores every opt-in speed-up; on a CPU none of the float8 ones;
    a flag the user gave is kept; full fine-tuning keeps its (absent) dropout alone."""
    from ocrtune.train import model_setup
    from ocrtune.train.args import SftArgs
    from ocrtune.train.model_setup import SPEED_MAX_TOKENS, speed_line, speed_max
    changes, skipped = speed_max(SftArgs(speed="max"), torch.device("cpu"))
    assert changes == {"lora_dropout": 0.0, "gradient_checkpointing": False, "packing": True,
                       "packing_tokens": SPEED_MAX_TOKENS}
    assert skipped == ["--fp8_base (float8 matmuls need a CUDA GPU)", "--lean_mlp_fp8 (float8 matmuls need a CUDA GPU)"]
    monkeypatch.setattr(model_setup, "float8_matmul_reason", lambda device, dtype: None)  # a Hopper card
    monkeypatch.setattr(model_setup, "train_dtype", lambda name, device: torch.bfloat16)
    changes, skipped = speed_max(SftArgs(speed="max", packing_tokens=4096), torch.device("cuda"))
    assert changes == {"fp8_base": True, "lean_mlp_fp8": True, "lora_dropout": 0.0, "gradient_checkpointing": False,
                       "packing": True} and skipped == ["--packing_tokens 4096 (given)"]
    assert speed_line(changes, skipped).startswith("--speed max: --fp8_base true --lean_mlp_fp8 true --lora_dropout 0.0")
    changes, skipped = speed_max(SftArgs(speed="max", train_type="full"), torch.device("cuda"))
    assert "fp8_base" not in changes and "lora_dropout" not in changes
    assert "--fp8_base (full fine-tuning trains the base weights)" in skipped
    assert speed_max(SftArgs(), torch.device("cuda")) == ({}, [])  # the default changes nothing
