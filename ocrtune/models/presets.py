"""Locally built Qwen2-VL-architecture models (random weights) for tests, demos and from-scratch runs.

No model hub is reachable offline, so `tiny` and `small` are built once from a config, with a
byte-level BPE tokenizer trained on LaTeX formulas (plus the Qwen2-VL special tokens), the real
Qwen2-VL image processor and chat template, and saved to a cache folder. From then on they load
through the same `from_pretrained` path as a downloaded model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent first builds are not guarded there
    fcntl = None

BUILD_VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# The chat template shipped with Qwen/Qwen2-VL-*-Instruct (chat_template.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Sizes. `tiny` runs the whole pipeline on 2 CPU cores in seconds; `small` learns LaTeX OCR from
# scratch in minutes on one GPU; `2b`/`7b` are the real Qwen2-VL shapes for speed benchmarks.
PRESETS = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True, mrope_section=[4, 6, 6], initializer_range=0.1),
        vision=dict(depth=2, embed_dim=64, num_heads=2), vocab=1024, max_pixels=64 * 28 * 28),
    "small": dict(
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4, tie_word_embeddings=True, mrope_section=[8, 12, 12]),
        vision=dict(depth=6, embed_dim=384, num_heads=6), vocab=2048, max_pixels=256 * 28 * 28),
    "2b": dict(
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, num_heads=16), vocab=2048, max_pixels=1280 * 28 * 28),
    "7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, num_heads=16), vocab=2048, max_pixels=1280 * 28 * 28),
    # Qwen2-VL-72B's shape (about 146 GB in bf16: only built with meta=True, then materialized sharded)
    "72b": dict(
        text=dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, tie_word_embeddings=False, vocab_size=152064, mrope_section=[16, 24, 24]),
        vision=dict(depth=32, embed_dim=1280, num_heads=16), vocab=2048, max_pixels=1280 * 28 * 28),
}
RANDOM_INIT_MARK = "ocrtune_random_init.json"  # a shape-only folder: training builds its weights randomly


def cache_root() -> Path:
    root = Path(os.environ.get("OCRTUNE_CACHE", Path.home() / ".cache" / "ocrtune")).expanduser()
    # a file where the cache (or a folder above it) should be: one line, not a NotADirectoryError at the first write
    from ocrtune.errors import UserError
    fix = "set OCRTUNE_CACHE to a folder you can write (or unset it for ~/.cache/ocrtune)"
    for p in (root, *root.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"the ocrtune cache {root} can't be made: {p} is not a folder", fix)
            break
    try:  # a place no folder can be made (/proc, a read-only mount): one line here, not at the first write
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"the ocrtune cache {root} can't be made ({e.strerror or type(e).__name__})", fix) from None
    return root


def preset_path(name: str) -> Path:
    """Cache folder of a preset; its name carries a hash of the preset's sizes (and the build code's
    version) so a changed preset is rebuilt, never silently reused."""
    key = hashlib.sha1(json.dumps([PRESETS[name], BUILD_VERSION], sort_keys=True).encode()).hexdigest()[:8]
    return cache_root() / "models" / f"{name}-{key}"


def formula_texts() -> list[str]:
    """LaTeX formulas to train the preset tokenizer on: the bundled sample's responses."""
    import pyarrow.parquet as pq

    from ocrtune.data.registry import SAMPLE_DIR
    return [t for f in sorted(SAMPLE_DIR.glob("*.parquet")) for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]


def build_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = ["You are a helpful assistant.", "Using LaTeX to perform OCR on the image.", "system user assistant"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts + extra * 50, trainer)
    return Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              additional_special_tokens=SPECIAL_TOKENS[1:], chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_preset(name: str, out: Path, texts: list[str] | None = None, seed: int = 0, meta: bool = False) -> Path:
    """Build preset `name` into folder `out` (written to a temp folder, then renamed into place).
    meta=True writes the config, generation config and processor only, plus RANDOM_INIT_MARK:
    training then builds the weights on the meta device and initializes them sharded."""
    import torch
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    p = PRESETS[name]
    tokenizer = build_tokenizer(texts if texts is not None else formula_texts(), p["vocab"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(p["text"])
    mrope = text.pop("mrope_section")
    text.setdefault("vocab_size", len(tokenizer))
    vision = dict(p["vision"], mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  in_chans=3, hidden_size=text["hidden_size"])
    config = Qwen2VLConfig(
        initializer_range=text.get("initializer_range", 0.02),
        text_config=dict(text, rope_theta=1e6, max_position_embeddings=32768,
                         rope_scaling={"type": "mrope", "mrope_section": mrope},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=text["tie_word_embeddings"])
    torch.manual_seed(seed)
    big = name in ("2b", "7b", "72b")
    device = "meta" if meta else ("cuda" if big and torch.cuda.is_available() else "cpu")
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16 if big else torch.float32)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=p["max_pixels"])
    image_processor.size = {"shortest_edge": 4 * 28 * 28, "longest_edge": p["max_pixels"]}
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN2_VL_CHAT_TEMPLATE)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    os.chmod(tmp, 0o755)
    if meta:
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        (tmp / RANDOM_INIT_MARK).write_text(json.dumps({"preset": name, "seed": seed}))
    else:
        model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def ensure_preset(name: str) -> Path:
    """Path of preset `name`, building it on first use (a few seconds for tiny). Processes that ask at once (the
    ranks of `NPROC_PER_NODE=2 ocrtune sft` on a fresh cache) build it once: the others wait on a lock, then load
    the finished folder, never one that a second build is replacing."""
    path = preset_path(name)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not (path / "config.json").exists():
            build_preset(name, path)
    return path
