"""Chat templates: a (messages, images) record -> input_ids, labels, pixel_values, image_grid_thw.

Each message is tokenized as its own segment so the loss mask follows the turn structure exactly:
prompt segments get label -100, assistant replies (and their <|im_end|>) are trained on. The text
matches the model's own chat template (tests compare the two), and each `<image>` tag in a message
becomes <|vision_start|> + N x <|image_pad|> + <|vision_end|>, N the image's merged patch count.
"""
from __future__ import annotations

import copy

import re
from dataclasses import dataclass, field

import torch

from ocrtune.data.images import check_size
from ocrtune.data.packing import IGNORE_INDEX, shared_cat
from ocrtune.data.pixels import make_light, refuse_light
IMAGE_TAG = "<image>"

# Default system prompt per template family (None: the family's chat template adds none).
DEFAULT_SYSTEM = {"qwen2_vl": "You are a helpful assistant.", "qwen2_5_vl": "You are a helpful assistant.", "qwen3_vl": None}


class SampleTooLong(ValueError):
    """The encoded sample is longer than --max_length (images can't be cut, so it is dropped)."""


@dataclass
class Template:
    processor: object  # a transformers Qwen*-VL processor
    template: str = "qwen2_vl"
    max_length: int | None = None
    system: str | None = None  # None: the family default
    # token ids of the prompt segments' texts around their images: they repeat from row to row, so a row costs one
    # tokenizer call, for its answer, instead of about five (`_prompt_ids`)
    _segment_ids: dict = field(default_factory=dict, repr=False, compare=False)
    _eight_bit: bool | None = field(default=None, repr=False, compare=False)  # whether the processor gives 8 bits

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def set_pixels(self, max_pixels: int | None = None, min_pixels: int | None = None) -> None:
        """Bound each image's pixel count; larger images are resized down (never rejected). The bounds go to this
        template's own copy of the processor (`self.processor` afterwards): a processor shared with a server, another
        template or the caller keeps its sizes."""
        ip = copy.deepcopy(self.processor.image_processor)
        self.processor = copy.copy(self.processor)
        self.processor.image_processor = ip
        size = dict(ip.size) if ip.size else {}
        if max_pixels:
            size["longest_edge"] = int(max_pixels)
        if min_pixels:
            size["shortest_edge"] = int(min_pixels)
        ip.size = {k: v for k, v in size.items() if k in ("longest_edge", "shortest_edge") and v}

    def _system(self) -> str | None:
        return self.system if self.system is not None else DEFAULT_SYSTEM.get(self.template)

    def _image_inputs(self, images, light_pixels: bool = False) -> tuple[dict, list[int]]:
        if not images:
            return {}, []
        for im in images:  # PIL images handed in directly: the processor would refuse > 200:1 with a traceback
            check_size(*im.size, max_pixels=2**62)
        ip = self.processor.image_processor
        frames = getattr(ip, "temporal_patch_size", None) or 1
        if light_pixels and frames > 1:
            out = self._light_pixels(ip, images, frames)
        else:
            out = ip(images=images, return_tensors="pt")
            out = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        merge = ip.merge_size ** 2
        counts = [int(g.prod()) // merge for g in out["image_grid_thw"]]
        return out, counts

    def _light_pixels(self, ip, images, frames: int) -> dict:
        """What the training loader's workers send (`data.pixels.make_light`: one frame, 8 bits where the processor
        gives them); whether it does is remembered, so a processor that can't is asked once an image from then on."""
        out, self._eight_bit = make_light(ip, images, frames, self._eight_bit)
        return out

    def _segments(self, messages: list[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
        """(text, trained) pieces of the conversation in chat-template order."""
        segs: list[tuple[str, bool]] = []
        system = self._system()
        if messages and messages[0]["role"] == "system":
            system, messages = messages[0]["content"], messages[1:]
        if system is not None:
            segs.append((f"<|im_start|>system\n{system}<|im_end|>\n", False))
        for m in messages:
            if m["role"] == "assistant":
                segs += [("<|im_start|>assistant\n", False), (m["content"] + "<|im_end|>", True), ("\n", False)]
            else:
                segs.append((f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", False))
        if add_generation_prompt:
            segs.append(("<|im_start|>assistant\n", False))
        return segs

    def _expand_images(self, text: str, counts: list[int], start: int) -> tuple[str, int]:
        def repl(_):
            nonlocal start
            n = counts[start]
            start += 1
            return "<|vision_start|>" + "<|image_pad|>" * n + "<|vision_end|>"
        return re.sub(re.escape(IMAGE_TAG), repl, text), start

    def image_token_count(self, width: int, height: int) -> int:
        """<|image_pad|> tokens for a width x height image, from the processor's resize arithmetic
        alone (what `_image_inputs` gives, without resizing or patchifying anything)."""
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        ip = self.processor.image_processor
        factor = ip.patch_size * ip.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=ip.size["shortest_edge"],
                            max_pixels=ip.size["longest_edge"])
        return (h // factor) * (w // factor)

    def token_count(self, messages: list[dict], image_sizes: list[tuple[int, int]]) -> int:
        """Length of `encode(messages, images)` for images of these (width, height) sizes, without
        decoding a pixel: what the packing planner and the length check need (a million rows cost
        seconds, not hours)."""
        messages = _with_image_tags(messages, len(image_sizes))
        return len(self._ids_labels(messages, [self.image_token_count(w, h) for w, h in image_sizes], False)[0])

    def _ids_labels(self, messages, counts: list[int], add_generation_prompt: bool) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        used = 0
        for text, trained in self._segments(messages, add_generation_prompt):
            if trained:
                text, used = self._expand_images(text, counts, used)
                piece = self.tokenizer.encode(text, add_special_tokens=False)
            else:
                piece, used = self._prompt_ids(text, counts, used)
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        return ids, labels

    def _prompt_ids(self, text: str, counts: list[int], start: int) -> tuple[list[int], int]:
        """Token ids of an untrained segment, its `<image>` tags expanded, and the next image's index. The text
        around the tags comes from a cache, the image blocks are spliced in as ids: the same ids as tokenizing the
        expanded text, as <|vision_start|>, <|image_pad|> and <|vision_end|> are special tokens, which the
        tokenizer splits on first (`tests/test_template.py` checks it), without keying the cache on pad counts."""
        pieces = text.split(IMAGE_TAG)
        if len(pieces) > 1 and self._segment_ids.get(None) is False:  # a tokenizer that joins across them
            text, start = self._expand_images(text, counts, start)
            return self.tokenizer.encode(text, add_special_tokens=False), start
        ids, first = self._cached_ids(pieces[0]), start
        if len(pieces) > 1:
            tok = self.tokenizer.convert_tokens_to_ids
            vs, pad, ve = tok("<|vision_start|>"), tok("<|image_pad|>"), tok("<|vision_end|>")
            for piece in pieces[1:]:
                ids += [vs] + [pad] * counts[start] + [ve] + self._cached_ids(piece)
                start += 1
            if None not in self._segment_ids:  # checked once against the plain way, on the first prompt with images
                whole = self.tokenizer.encode(self._expand_images(text, counts, first)[0], add_special_tokens=False)
                self._segment_ids[None] = whole == ids
                if whole != ids:
                    return whole, start
        return ids, start

    def _cached_ids(self, text: str) -> list[int]:
        ids = self._segment_ids.get(text)
        if ids is None:
            if len(self._segment_ids) >= 4096:  # prompts that differ row to row: bounded, not a leak
                self._segment_ids.clear()
            ids = self._segment_ids[text] = self.tokenizer.encode(text, add_special_tokens=False)
        return list(ids)

    def __getstate__(self) -> dict:
        # pickled without the cache: `datasets` fingerprints map functions that close over a template by pickling
        # them, and a cache filled by earlier rows would change the fingerprint (no cache hits on reruns)
        return {**self.__dict__, "_segment_ids": {}, "_eight_bit": None}

    def encode(self, messages: list[dict], images: list, add_generation_prompt: bool = False,
               light_pixels: bool = False) -> dict:
        """Tokenize one conversation. Training: pass the full messages; inference: the prompt and
        add_generation_prompt=True (labels then are all -100). `light_pixels`: the pixels in the form the training
        loader's workers send (`data.pixels`: one frame, 8 bits; `pixel_frames` and `pixel_norm` say how to
        restore them), which `train.data.Collator` turns into a plain model input where one is needed."""
        messages = _with_image_tags(messages, len(images))
        vision, counts = self._image_inputs(images, light_pixels)
        ids, labels = self._ids_labels(messages, counts, add_generation_prompt)
        if self.max_length and len(ids) > self.max_length:
            raise SampleTooLong(f"sample has {len(ids)} tokens, over --max_length {self.max_length}")
        pad_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        # transformers 5 computes M-RoPE positions from these modality types (0 text, 1 image)
        types = [1 if t == pad_id else 0 for t in ids]
        return {"input_ids": ids, "labels": labels, "mm_token_type_ids": types, **vision}

    def chat_text(self, messages: list[dict], n_images: int, add_generation_prompt: bool = False) -> str:
        """The conversation as text with one <|image_pad|> per image, as the HF chat template writes it."""
        messages = _with_image_tags(messages, n_images)
        return "".join(t for t, _ in self._segments(messages, add_generation_prompt)).replace(
            IMAGE_TAG, "<|vision_start|><|image_pad|><|vision_end|>")


def _with_image_tags(messages: list[dict], n_images: int) -> list[dict]:
    """SWIFT convention: `<image>` marks where images go; images without tags go before the first
    user query."""
    tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
    if tags > n_images:
        raise ValueError(f"messages have {tags} <image> tags but the row has {n_images} images")
    if tags == n_images:
        return messages
    out = [dict(m) for m in messages]
    first_user = next(i for i, m in enumerate(out) if m["role"] == "user")
    out[first_user]["content"] = IMAGE_TAG * (n_images - tags) + out[first_user]["content"]
    return out


def collate(samples: list[dict], pad_token_id: int, pixel_dtype: torch.dtype | None = None) -> dict:
    """Right-pad a list of encoded samples into a batch (`pixel_dtype` casts the pixels as they are joined)."""
    for s in samples:
        refuse_light(s, "models.template.collate")
    n = max(len(s["input_ids"]) for s in samples)
    input_ids = torch.full((len(samples), n), pad_token_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    types = torch.zeros((len(samples), n), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s["input_ids"])
        input_ids[i, :k] = torch.tensor(s["input_ids"])
        labels[i, :k] = torch.tensor(s["labels"])
        types[i, :k] = torch.tensor(s["mm_token_type_ids"])
        mask[i, :k] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "mm_token_type_ids": types}
    with_images = [s for s in samples if "pixel_values" in s]
    if with_images:
        batch["pixel_values"] = shared_cat([s["pixel_values"] for s in with_images], pixel_dtype)  # (shared memory in workers)
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in with_images])
    return batch
