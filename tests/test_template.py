"""The training template matches the model's own chat template and masks all but the response."""
from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from transformers import AutoProcessor

from ocrtune.data.images import open_image
from ocrtune.data.registry import OCR_PROMPT, SAMPLE_DIR
from ocrtune.data.packing import IGNORE_INDEX
from ocrtune.models.template import SampleTooLong, Template, collate


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return AutoProcessor.from_pretrained(tiny_model_dir)


def row():
    r = pq.read_table(SAMPLE_DIR / "train.parquet").slice(3, 1).to_pylist()[0]
    return [{"role": "user", "content": "<image>" + OCR_PROMPT}, {"role": "assistant", "content": r["text"]}], \
        [open_image(r["image"])], r["text"]


def test_encoding_equals_hf_chat_template_and_processor(processor):
    msgs, images, text = row()
    enc = Template(processor).encode(msgs, images)
    hf_text = processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": OCR_PROMPT}]},
        {"role": "assistant", "content": [{"type": "text", "text": text}]}])
    ref = processor(text=[hf_text], images=images, return_tensors="pt")
    assert enc["input_ids"] == ref["input_ids"][0].tolist()
    assert enc["mm_token_type_ids"] == ref["mm_token_type_ids"][0].tolist()
    assert (enc["pixel_values"] == ref["pixel_values"]).all()


def test_loss_only_on_response_and_end_token(processor):
    msgs, images, text = row()
    enc = Template(processor).encode(msgs, images)
    trained = [t for t, l in zip(enc["input_ids"], enc["labels"]) if l != IGNORE_INDEX]
    assert processor.tokenizer.decode(trained) == text + "<|im_end|>"


def test_generation_prompt_matches_hf(processor):
    msgs, images, _ = row()
    enc = Template(processor).encode(msgs[:1], images, add_generation_prompt=True)
    hf = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": OCR_PROMPT}]}],
                                       add_generation_prompt=True)
    assert enc["input_ids"] == processor(text=[hf], images=images)["input_ids"][0]
    assert all(l == IGNORE_INDEX for l in enc["labels"])


def test_max_pixels_bounds_image_tokens_and_max_length(processor):
    msgs, images, _ = row()
    t = Template(processor)
    big = images[0].resize((images[0].width * 8, images[0].height * 8))
    t.set_pixels(max_pixels=28 * 28 * 8)
    enc = t.encode(msgs, [big])
    assert int(enc["image_grid_thw"].prod()) * 14 * 14 <= 28 * 28 * 8
    t.max_length = 20
    with pytest.raises(SampleTooLong):
        t.encode(msgs, images)


def test_collate_pads_right(processor):
    msgs, images, _ = row()
    t = Template(processor)
    a = t.encode(msgs, images)
    b = t.encode([msgs[0], {"role": "assistant", "content": "x"}], images)
    batch = collate([a, b], processor.tokenizer.pad_token_id)
    n = max(len(a["input_ids"]), len(b["input_ids"]))
    assert batch["input_ids"].shape == (2, n)
    assert batch["attention_mask"][1].sum() == len(b["input_ids"])
    assert (batch["labels"][1, len(b["input_ids"]):] == IGNORE_INDEX).all()
    assert batch["image_grid_thw"].shape == (2, 3)


def test_prompt_ids_from_the_cache_equal_tokenizing_the_expanded_text(processor):
    """The prompt segments' texts around their images are tokenized once and cached, the image blocks spliced in as
    ids: the same ids as tokenizing each expanded segment, for 0, 1 and 2 images, tags first, between words and last;
    a tokenizer for which splicing differs (checked once, on the first prompt with images) gets the plain way."""
    from ocrtune.models.template import _with_image_tags

    def plain(t, msgs, counts):
        ids, used = [], 0
        for text, _ in t._segments(_with_image_tags(msgs, len(counts)), False):
            text, used = t._expand_images(text, counts, used)
            ids += t.tokenizer.encode(text, add_special_tokens=False)
        return ids

    answer = {"role": "assistant", "content": "x ^ { 2 }"}
    cases = [([{"role": "user", "content": "plain text, no image"}, answer], []),
             ([{"role": "user", "content": "<image>" + OCR_PROMPT}, answer], [7]),
             ([{"role": "user", "content": "left <image> middle <image>"}, answer], [3, 12]),
             ([{"role": "system", "content": "be brief"}, {"role": "user", "content": "<image><image> two"}, answer], [5, 1])]
    for check in (None, False):
        t = Template(processor)
        if check is not None:
            t._segment_ids[None] = check  # as if the once-only check had found splicing wrong
        for _ in range(2):  # the second time from the cache
            for msgs, counts in cases:
                assert t._ids_labels(_with_image_tags(msgs, len(counts)), counts, False)[0] == plain(t, msgs, counts)
        assert t._segment_ids[None] is (check if check is not None else True)
    # pickled (as `datasets` does to fingerprint a map function) without the cache: the same bytes after use
    import pickle
    fresh = Template(processor)
    before = pickle.dumps(fresh)
    fresh._ids_labels(_with_image_tags(cases[1][0], 1), [7], False)
    assert fresh._segment_ids and pickle.dumps(fresh) == before


def test_set_pixels_bounds_the_templates_own_processor_not_the_one_given(processor):
    """A processor shared with a server or another template keeps its sizes; the template's copy (what the
    trainer saves in checkpoints and export in the merged folder) carries the bounds."""
    before = dict(processor.image_processor.size)
    t = Template(processor)
    t.set_pixels(max_pixels=28 * 28 * 8, min_pixels=28 * 28 * 2)
    assert dict(processor.image_processor.size) == before
    assert t.processor.image_processor.size == {"longest_edge": 28 * 28 * 8, "shortest_edge": 28 * 28 * 2}
    assert t.processor.tokenizer is processor.tokenizer
