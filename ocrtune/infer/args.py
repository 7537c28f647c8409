"""Arguments of `ocrtune infer` and `ocrtune eval` (SWIFT's names). `ExportArgs` lives in `ocrtune.export.args`."""
from __future__ import annotations

from dataclasses import dataclass

from ocrtune.args import arg
from ocrtune.export.args import ExportArgs  # noqa: F401  (moved; issue 14)


@dataclass
class InferArgs:
    ckpt_dir: str | None = arg(None, "checkpoint folder from ocrtune sft (reads the run's args.json), or a merged folder")
    model: str | None = arg(None, "base model (hub id, folder or preset) when no --ckpt_dir is given", aliases=("--model_id_or_path",))
    model_type: str | None = arg(None, "registry name, e.g. qwen2-vl-7b-instruct")
    use_hf: bool = arg(True, "download from Hugging Face (true) or ModelScope (false)", env="USE_HF")
    merge_lora: bool = arg(False, "merge the LoRA adapter into the weights first (writes checkpoint-N-merged/)")
    force: bool = arg(False, "merge again even if the merged folder exists")
    image: str | None = arg(None, "one-shot: image path or URL")
    query: str | None = arg(None, "one-shot query (default: the OCR prompt)")
    load_dataset_config: bool = arg(False, "run on the training run's own validation split")
    dataset: list[str] = arg(None, "run on these datasets (registry names, files or folders; name#N samples N)")
    val_dataset: list[str] = arg(None, "same as --dataset")
    split: str = arg("validation", "split of registry datasets to use")
    metrics: str = arg("bleu,edit_distance,exact_match", "comma-separated: bleu, edit_distance, exact_match, token_acc, render")
    infer_batch_size: int = arg(8, "batch size for generation", aliases=("--batch_size",))
    max_new_tokens: int = arg(512, "longest answer in tokens")
    temperature: float = arg(0.0, "0 = greedy")
    top_p: float = arg(1.0, "nucleus sampling when temperature > 0")
    num_beams: int = arg(1, "beam search width")
    max_pixels: int | None = arg(None, "largest image size in pixels (default: the run's)", env="MAX_PIXELS")
    stream: bool = arg(True, "print the answer token by token (interactive mode)")
    result_path: str | None = arg(None, "results jsonl (default: <ckpt_dir>/infer_result/<time>.jsonl)")
    dtype: str = arg("auto", "auto, bfloat16, float16 or float32", aliases=("--torch_dtype",))
    seed: int = arg(42, "seed for sampling and dataset sampling")


def gen_kwargs(args: InferArgs) -> dict:
    """The generation settings of `args`, as `InferEngine.generate`/`stream` take them."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
            "num_beams": args.num_beams}


_gen_kwargs = gen_kwargs  # moved from ocrtune.infer.cli (issue 14)
