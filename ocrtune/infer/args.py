"""Arguments of `ocrtune infer` and `ocrtune eval` (SWIFT's names). `ExportArgs` lives in `ocrtune.export.args`."""
from __future__ import annotations

from dataclasses import dataclass

from ocrtune.args import (SEED, arg, ckpt_dir_arg, decode_arg, dtype_arg, ints, max_new_tokens_arg, max_pixels_arg,
                          merge_lora_arg, model_arg, model_type_arg, quant_bits_arg, reals, tex_root_arg, use_hf_arg)


@dataclass
class InferArgs:
    ckpt_dir: str | None = ckpt_dir_arg()
    model: str | None = model_arg()
    model_type: str | None = model_type_arg()
    use_hf: bool = use_hf_arg()
    merge_lora: bool = merge_lora_arg()
    force: bool = arg(False, "merge again even if the merged folder exists")
    image: str | None = arg(None, "one-shot: image path or URL")
    query: str | None = arg(None, "one-shot query (default: the OCR prompt)")
    load_dataset_config: bool = arg(False, "run on the training run's own validation split")
    dataset: list[str] = arg(None, "run on these datasets (registry names, files or folders; name#N samples N)")
    val_dataset: list[str] = arg(None, "same as --dataset")
    split: str = arg("validation", "split of registry datasets to use")
    metrics: str = arg("bleu,edit_distance,exact_match", "comma-separated: bleu, edit_distance, exact_match, token_acc, "
                                                          "render, cdm (needs pdflatex)")
    tex_root: str | None = tex_root_arg("--metrics cdm")
    infer_batch_size: int = arg(8, "batch size for generation", aliases=("--batch_size",), domain=ints(1, 65536))
    max_new_tokens: int = max_new_tokens_arg(512, "longest answer in tokens")
    temperature: float = arg(0.0, "0 = greedy", domain=reals(0, 100))
    top_p: float = arg(1.0, "nucleus sampling when temperature > 0", domain=reals(0, 1, lo_open=True))
    num_beams: int = arg(1, "beam search width", domain=ints(1, 64))
    max_pixels: int | None = max_pixels_arg("largest image size in pixels (default: the run's)")
    stream: bool = arg(True, "print the answer token by token (interactive mode)")
    result_path: str | None = arg(None, "results jsonl (default: <ckpt_dir>/infer_result/<time>.jsonl)")
    dtype: str = dtype_arg(choices=None)
    quant_bits: int | None = quant_bits_arg("run the base model in 4 bits (NF4) or 8 by bitsandbytes, with or without "
                                            "an adapter (a QLoRA run's base); default: unquantized")
    seed: int = arg(42, "seed for sampling and dataset sampling", domain=SEED)
    decode: str = decode_arg()


def gen_kwargs(args: InferArgs) -> dict:
    """The generation settings of `args`, as `InferEngine.generate`/`stream` take them."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "num_beams": args.num_beams}
