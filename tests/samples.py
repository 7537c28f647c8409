"""Bundled sample rows as canonical records, and PNG files of their images, for the tests."""
from __future__ import annotations

import io
from pathlib import Path

from ocrtune.data.registry import OCR_PROMPT, SAMPLE_DIR


def sample_rows(n: int, split: str = "validation") -> list[dict]:
    import pyarrow.parquet as pq
    t = pq.read_table(SAMPLE_DIR / f"{split}.parquet").slice(0, n).to_pylist()
    return [{"messages": [{"role": "user", "content": "<image>" + OCR_PROMPT}, {"role": "assistant", "content": r["text"]}],
             "images": [{"bytes": r["image"]["bytes"], "path": None}]} for r in t]


def write_png(row: dict, path: Path) -> Path:
    from PIL import Image
    Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB").save(path)
    return path


def tiny_parts(model_dir, device: str = "cpu"):
    """(model in float32, eval mode, on `device`; processor; qwen2_vl template) of a model folder."""
    import torch

    from ocrtune.models.loading import load_model, load_processor
    from ocrtune.models.template import Template
    processor = load_processor(model_dir)
    model = load_model(model_dir, torch.float32).to(device).eval()
    return model, processor, Template(processor, "qwen2_vl")


def tiny_engine(parts, **kw):
    """An InferEngine over `parts` (tiny_parts) that encodes inline (workers=0)."""
    from ocrtune.models.generate import InferEngine
    model, processor, template = parts
    return InferEngine(model, processor, template, workers=0, **kw)


def mixed_prompts(n: int) -> list[dict]:
    """Prompts of very different lengths: `n` images of several sizes (one with a long text query) and a
    text-only row after the fifth."""
    rs = [{"messages": r["messages"][:1], "images": r["images"]} for r in sample_rows(n)]
    rs[3] = {"messages": [{"role": "user", "content": "<image>" + OCR_PROMPT + " Write every symbol, " * 12}],
             "images": rs[3]["images"]}
    rs.insert(5, {"messages": [{"role": "user", "content": "a question without an image"}]})
    return rs


def stop_early(model, processor):
    """Bias the <|im_end|> logit by the first hidden feature, so some rows end after a few tokens and others run to
    max_new_tokens (a random tiny model rarely stops on its own). Returns the hook's handle (`.remove()` it)."""
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def hook(module, inputs, out):
        out = out.clone()
        out[..., end] += 2.0 * inputs[0][..., 0] + 1.0
        return out
    return model.lm_head.register_forward_hook(hook)
