"""QLoRA (--quant_method bnb --quant_bits 4): flags, refusals, the 4-bit base on CPU (bitsandbytes >= 0.48 has CPU
kernels), the fused LoRA path over it, the saved adapter under plain PEFT, and the bf16 merge of a QLoRA adapter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ocrtune.cli.main import main
from ocrtune.errors import UserError
from ocrtune.models import quant
from ocrtune.train.args import SftArgs, normalized, validate

needs_bnb = pytest.mark.skipif(quant.bnb_version() is None or quant.bnb_version() < quant.BNB_CPU_MIN,
                               reason="bitsandbytes with CPU kernels (>= 0.48) not installed")


def _error_line(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


# ---------------------------------------------------------------- flags and refusals (no model loaded)

def test_qlora_spellings_mean_lora_over_4_bits():
    for args in (SftArgs(train_type="qlora"), SftArgs(quant_bits=4), SftArgs(quant_method="bnb", quant_bits=4)):
        validate(args)
        n = normalized(args)
        assert (n.train_type, n.quant_bits, n.quant_method) == ("lora", 4, "bnb")
    plain = SftArgs()
    assert normalized(plain) is plain and plain.quant_bits is None


def test_quantization_bit_alias_and_qlora_reach_the_args():
    from ocrtune.cli.parsing import OneLineParser, add_dataclass_args, build
    parser = OneLineParser(prog="ocrtune sft")
    add_dataclass_args(parser, SftArgs)
    args = build(SftArgs, parser.parse_args(["--quantization_bit", "8", "--sft_type", "qlora"]))
    n = normalized(args)
    assert (n.train_type, n.quant_bits, n.quant_method) == ("lora", 8, "bnb")
    assert {"quant_bits", "quant_method", "train_type"} <= n._given_flags


@pytest.mark.parametrize("flags, expected", [
    (["--quant_bits", "3"], "error: ocrtune sft: argument --quant_bits/--quantization_bit: invalid choice: 3 (choose "
                            "from 4, 8)"),
    (["--quant_bits", "4", "--train_type", "full"], "error: --quant_bits 4 freezes the base in 4 bits, and --train_type "
     "full trains every weight; use --train_type lora (or qlora) over the quantized base, or drop --quant_bits for full "
     "fine-tuning"),
    (["--train_type", "qlora", "--fp8_base", "true"], "error: --fp8_base and --quant_bits 4 both replace the frozen base "
     "weights; use one: --quant_bits 4 (least memory) or --fp8_base (float8 matmuls, faster)"),
    (["--quant_bits", "4", "--fsdp", "full_shard auto_wrap"], "error: a base quantized by --quant_bits 4 runs on one GPU "
     "or with DDP (NPROC_PER_NODE=<GPUs>), not sharded by --fsdp/--deepspeed; drop --fsdp/--deepspeed (a 4-bit 7B fits "
     "one GPU), or drop --quant_bits"),
    (["--quant_bits", "4", "--deepspeed", "zero3"], "not sharded by --fsdp/--deepspeed"),
    (["--quant_bits", "4", "--lean_mlp", "true"], "error: --lean_mlp recomputes the MLP's down projection"),
    (["--quant_method", "bnb"], "error: --quant_method bnb needs --quant_bits 4 or 8; add --quant_bits 4 (QLoRA)"),
    (["--quant_method", "gptq", "--quant_bits", "4"], "error: ocrtune sft: argument --quant_method: invalid choice"),
])
def test_sft_quant_refusals_are_one_line(capsys, tmp_path, flags, expected):
    line = _error_line(capsys, ["sft", "--output_dir", str(tmp_path), *flags])
    assert line.startswith(expected) if expected.startswith("error:") else expected in line
    assert not any(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("command", ["infer", "eval"])
def test_infer_and_eval_refuse_3_bits(capsys, command):
    line = _error_line(capsys, [command, "--model", "tiny", "--quant_bits", "3"])
    assert line.startswith(f"error: ocrtune {command}: argument --quant_bits/--quantization_bit: invalid choice: 3 "
                           "(choose from 4, 8)")


def test_serve_refuses_3_bits():
    from ocrtune.serve.app import validate as serve_validate
    from ocrtune.serve.args import ServeArgs
    with pytest.raises(UserError, match=r"^--quant_bits 3: bitsandbytes quantizes to 4 or 8 bits"):
        serve_validate(ServeArgs(quant_bits=3))
    from ocrtune.args import ModelSource
    assert ModelSource.of(ServeArgs(model="tiny", quant_bits=4)).quant_bits == 4


def test_missing_or_cpu_less_bitsandbytes_is_one_error():
    with pytest.raises(UserError) as e:
        quant.check_quant_backend(4, "cpu", version=None)
    assert str(e.value) == ('--quant_bits 4 quantizes the base with bitsandbytes, which is not installed; pip install '
                            '"ocrtune[qlora]" (bitsandbytes), or drop --quant_bits to train over the bf16 base (plain LoRA)')
    with pytest.raises(UserError, match=r"^--quant_bits 4 needs a CUDA GPU with bitsandbytes 0.45.0 \(CPU kernels came "
                                        r"in 0.48\); run on a GPU"):
        quant.check_quant_backend(4, "cpu", version=(0, 45, 0))
    quant.check_quant_backend(4, "cuda", version=(0, 45, 0))  # CUDA kernels: fine


def test_sft_without_bitsandbytes_stops_before_reading_data(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(quant, "bnb_version", lambda: None)
    line = _error_line(capsys, ["sft", "--output_dir", str(tmp_path), "--train_type", "qlora", "--dataset", "nope-xyz"])
    assert line.startswith("error: --quant_bits 4 quantizes the base with bitsandbytes, which is not installed")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the 4-bit base on CPU

@pytest.fixture(scope="module")
def tiny_4bit(tiny_model_dir):
    from ocrtune.models.loading import load_model
    return load_model(tiny_model_dir, torch.float32, device=torch.device("cpu"), quant_bits=4)


@needs_bnb
def test_4bit_load_keeps_vit_head_and_embeddings_unquantized(tiny_4bit):
    names = quant.quantized_names(tiny_4bit)
    assert names and all(".language_model." in f".{n}." for n in names)  # every LM linear, nothing else
    lm_linears = [n for n, m in tiny_4bit.named_modules() if ".language_model." in f".{n}." and isinstance(m, torch.nn.Linear)]
    assert sorted(names) == sorted(lm_linears)
    assert quant.model_quant_bits(tiny_4bit) == 4
    assert tiny_4bit.get_input_embeddings().weight.dtype == torch.float32
    assert not quant.is_bnb_linear(tiny_4bit.get_output_embeddings())
    w = tiny_4bit.model.language_model.layers[0].mlp.down_proj.weight
    assert type(w).__name__ == "Params4bit" and w.quant_state.nested  # NF4 with double quantization
    assert w.quant_type == "nf4"


@needs_bnb
def test_fused_lora_over_4bit_base_matches_peft(tiny_4bit):
    """The fused addmm over bitsandbytes' output: PEFT's forward and gradients (same math), and the base output is
    the dequantized weight's, not the packed integers'."""
    from peft import LoraConfig
    from peft.tuners.lora import bnb as lora_bnb

    from ocrtune.models.patches.lora import _fused_lora_forward, fuse_lora_linears
    base = tiny_4bit.model.language_model.layers[0].mlp.up_proj
    torch.manual_seed(0)
    layer = lora_bnb.Linear4bit(base, "default", config=LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8,
                                lora_dropout=0.0, init_lora_weights=False)
    holder = torch.nn.Sequential(layer)
    x = torch.randn(2, 5, base.in_features, requires_grad=True)
    ref = layer(x)
    ref.square().sum().backward()
    grads = [x.grad.clone(), layer.lora_A["default"].weight.grad.clone(), layer.lora_B["default"].weight.grad.clone()]
    assert fuse_lora_linears(holder) == 1 and layer.forward.__func__ is _fused_lora_forward
    x.grad = None
    layer.zero_grad()
    out = layer(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    for got, want in zip([x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad], grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    w = quant.dequantized_weight(base).float()
    with torch.no_grad():  # the base output is x @ dequantized W^T (bf16 compute): within bf16 rounding of it
        torch.testing.assert_close(base(x).float(), x @ w.t(), rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def qlora_run(tiny_model_dir, tmp_path_factory):
    """Two QLoRA steps over the tiny model's 4-bit base, a checkpoint after each (one sft run, shared below)."""
    from ocrtune.train.data import rows_data
    from ocrtune.train.trainer import SftRun
    from tests.samples import sample_rows
    if quant.bnb_version() is None or quant.bnb_version() < quant.BNB_CPU_MIN:
        pytest.skip("bitsandbytes with CPU kernels (>= 0.48) not installed")
    # an evaluation after step 1, then step 2: the 4-bit weights keep their training layout through it (CPU)
    common = dict(model=str(tiny_model_dir), train_type="qlora", max_steps=2, batch_size=2, eval_steps=1,
                  save_steps=1, save_total_limit=None, dataset_test_ratio=0, report_to=["none"], lora_dropout=0.0,
                  learning_rate=5e-3, output_dir=str(tmp_path_factory.mktemp("qlora")))
    rows = sample_rows(4)
    out = SftRun(SftArgs(**common), data=rows_data(rows, rows[:2])).train()
    ckpt = Path(out["last_model_checkpoint"])
    return {"common": common, "rows": rows, "run_dir": ckpt.parent, "ckpt": ckpt}


def test_qlora_sft_saves_a_plain_adapter_that_peft_loads_over_a_4bit_base(tiny_model_dir, qlora_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    saved = json.loads((qlora_run["run_dir"] / "args.json").read_text())
    assert (saved["train_type"], saved["quant_bits"], saved["quant_method"]) == ("lora", 4, "bnb")
    adapter = load_file(qlora_run["ckpt"] / "adapter_model.safetensors")
    assert adapter and all("lora_" in k and v.is_floating_point() for k, v in adapter.items())
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, quantization_config=quant.bnb_config(4),
                                                       device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, str(qlora_run["ckpt"]))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(adapter) and quant.model_quant_bits(model) == 4


def test_qlora_resume_ends_where_the_uninterrupted_run_does(qlora_run):
    """Resumed from checkpoint-1, the run's step 2 writes the adapter the uninterrupted run wrote, bit for bit."""
    from safetensors.torch import load_file

    from ocrtune.train.data import rows_data
    from ocrtune.train.trainer import SftRun
    straight = load_file(qlora_run["ckpt"] / "adapter_model.safetensors")
    args = SftArgs(**qlora_run["common"], resume_from_checkpoint=str(qlora_run["run_dir"] / "checkpoint-1"))
    out = SftRun(args, data=rows_data(qlora_run["rows"], qlora_run["rows"][:2])).train()
    again = load_file(Path(out["last_model_checkpoint"]) / "adapter_model.safetensors")
    assert again.keys() == straight.keys()
    for k, v in straight.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0)


# merged weights are stored in bf16: each rounded to 8 significant bits (relative error <= 2^-9); through the tiny
# model that moves the logits by at most MERGE_BOUND of the largest one (measured 0.015 on CPU)
MERGE_BOUND = 0.03


def test_qlora_merge_is_bf16_from_unquantized_weights(tiny_model_dir, qlora_run, tmp_path, capsys):
    """export --merge_lora of a QLoRA adapter: bf16, from the base's own weights (never dequantized 4-bit ones);
    its logits match the adapter over the unquantized base within MERGE_BOUND, and it says so."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from ocrtune.export.merge import merge_lora
    from ocrtune.models.template import Template
    from ocrtune.models.loading import load_processor
    out = merge_lora(qlora_run["ckpt"], tmp_path / "merged")
    err = capsys.readouterr().err
    assert f"merging a QLoRA adapter (trained over a 4-bit base) into the unquantized weights of {tiny_model_dir} in bfloat16" in err
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    merged = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    assert next(iter(merged.state_dict().values())).dtype == torch.float32  # upcast here; stored as bf16
    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    stored = base.model.language_model.layers[0].mlp.up_proj.weight
    ref = PeftModel.from_pretrained(base, str(qlora_run["ckpt"])).eval()
    # a weight with no adapter on it is the base's own, rounded to bf16: not the NF4 grid's values
    torch.testing.assert_close(merged.model.language_model.embed_tokens.weight,
                               base.model.language_model.embed_tokens.weight.to(torch.bfloat16).float(), rtol=0, atol=0)
    delta = (merged.model.language_model.layers[0].mlp.up_proj.weight - stored).abs().max()
    assert delta < 0.05 * stored.abs().max()  # NF4's error would be ~1/16 of the block's absmax, far more than bf16's
    tmpl = Template(load_processor(tiny_model_dir), "qwen2_vl", None)
    from tests.samples import sample_rows
    row = sample_rows(1)[0]
    from ocrtune.data.images import open_image
    enc = tmpl.encode(row["messages"], [open_image(r) for r in row["images"]])
    batch = {"input_ids": torch.tensor([enc["input_ids"]]), "pixel_values": enc["pixel_values"],
             "image_grid_thw": enc["image_grid_thw"], "mm_token_type_ids": torch.tensor([enc["mm_token_type_ids"]])}
    with torch.no_grad():
        want, got = ref(**batch).logits, merged.eval()(**batch).logits
    assert (got - want).abs().max() <= MERGE_BOUND * want.abs().max()
