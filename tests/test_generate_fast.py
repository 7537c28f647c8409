"""InferEngine's fast path: length-sorted batches, prompts encoded ahead, and the greedy loop
that drops finished rows give the same answers as plain `model.generate`, in row order."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ocrtune.data.registry import OCR_PROMPT, SAMPLE_DIR
from samples import mixed_prompts, sample_rows, write_png

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return [*mixed_prompts(10), {"messages": [{"role": "user", "content": "x" * 3}]}]


def engines(parts, **kw):
    from ocrtune.models.generate import InferEngine
    model, processor, template = parts
    return InferEngine(model, processor, template, **kw), InferEngine(model, processor, template, fast=False, workers=0)


def plain(slow, rows, batch_size, max_new_tokens):
    """model.generate over batches in row order (no sorting, no row dropping)."""
    out = []
    for s in range(0, len(rows), batch_size):
        out += slow.generate_answers(rows[s:s + batch_size], max_new_tokens)
        assert slow.last_path == "generate"
    return out


@pytest.mark.parametrize("check_every", [1, 4])
def test_greedy_matches_generate_with_rows_ending_early(parts, rows, stops_early, check_every):
    fast, slow = engines(parts, check_every=check_every)
    got = fast.answer_rows(rows, batch_size=5, max_new_tokens=20)
    want = plain(slow, rows, 5, 20)
    assert got == want
    assert fast.last_path == "fast" and fast.stats["fast_batches"] == 3
    reasons = {a.finish_reason for a in got}
    assert reasons == {"stop", "length"}, [(a.tokens, a.finish_reason) for a in got]
    assert fast.stats["rows_dropped_early"] > 0
    assert any(1 < a.tokens < 20 and a.finish_reason == "stop" for a in got)


def test_one_batch_matches_generate(parts, rows, stops_early):
    """The same batch through both decoders: identical down to the token counts."""
    fast, slow = engines(parts, check_every=1)
    assert fast.generate_answers(rows, 16) == slow.generate_answers(rows, 16)


def test_results_come_back_in_row_order(parts, rows):
    fast, slow = engines(parts)
    seen = [i for i, _ in fast.iter_answers(rows, batch_size=4, max_new_tokens=6)]
    assert sorted(seen) == list(range(len(rows))) and seen != sorted(seen)  # batches went by length, not by index
    longest = max(range(len(rows)), key=lambda i: len(fast.encode_prompt(rows[i])["input_ids"]))
    assert seen[0] == longest  # longest prompts first
    one_by_one = [slow.generate_answers([r], 6)[0] for r in rows]
    assert fast.answer_rows(rows, batch_size=4, max_new_tokens=6) == one_by_one
    assert fast.generate_rows(rows, batch_size=4, max_new_tokens=6) == [a.text for a in one_by_one]


def test_repetition_penalty_of_the_generation_config_is_reproduced(parts, rows):
    model = parts[0]
    fast, slow = engines(parts)
    model.generation_config.repetition_penalty = 1.5
    try:
        assert fast.fast_reason() is None
        assert fast.answer_rows(rows, 4, 12) == plain(slow, rows, 4, 12)
        assert fast.last_path == "fast"
        model.generation_config.no_repeat_ngram_size = 2  # a processor the loop doesn't have: generate decodes
        assert "no_repeat_ngram_size" in fast.fast_reason()
        assert fast.answer_rows(rows, 4, 12) == plain(slow, rows, 4, 12)
        assert fast.last_path == "generate"
    finally:
        model.generation_config.repetition_penalty = 1.0
        model.generation_config.no_repeat_ngram_size = 0


def test_sampling_beams_and_sharded_models_keep_generate(parts, rows):
    from ocrtune.models.generate import InferEngine
    from ocrtune.train.distributed import SyncedGenerate
    model, processor, template = parts
    fast, _ = engines(parts)
    fast.generate_answers(rows[:2], 4, num_beams=2)
    assert fast.last_path == "generate"
    torch.manual_seed(0)
    fast.generate_answers(rows[:2], 4, temperature=0.7)
    assert fast.last_path == "generate"
    assert "sharded" in InferEngine(SyncedGenerate(model), processor, template).fast_reason()


def test_a_bad_row_gets_its_error_and_the_others_their_answers(parts, rows, tmp_path):
    from ocrtune.data.images import BadImage
    fast, slow = engines(parts)
    bad = {"messages": [{"role": "user", "content": "<image>" + OCR_PROMPT}], "images": [str(tmp_path / "gone.png")]}
    mixed = rows[:3] + [bad] + rows[3:6]
    got = fast.answer_rows(mixed, batch_size=3, max_new_tokens=5)
    assert isinstance(got[3], BadImage) and "not found" in str(got[3])
    assert got[:3] + got[4:] == plain(slow, rows[:6], 3, 5)
    with pytest.raises(BadImage):
        fast.generate_rows(mixed, batch_size=3, max_new_tokens=5)
    with pytest.raises(BadImage):  # a batch handed in whole fails whole (serve then retries it request by request)
        fast.generate_answers(mixed, 5)


def test_eval_writes_an_error_line_for_a_bad_image_in_row_order(tiny_model_dir, tmp_path, capsys):
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.cli import run_eval
    images = [write_png(r, tmp_path / f"s{i}.png") for i, r in enumerate(sample_rows(5))]
    lines = [{"query": "<image>" + OCR_PROMPT, "response": "x", "images": [str(p)]} for p in images]
    lines.insert(2, {"query": "<image>" + OCR_PROMPT, "response": "y", "images": [str(tmp_path / "gone.png")]})
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "r.jsonl"
    summary = run_eval(InferArgs(model=str(tiny_model_dir), dataset=[str(data)], infer_batch_size=2, max_new_tokens=4,
                                 result_path=str(out)))
    res = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in res] == list(range(6)) and [r["image"] for r in res] == [str(p) for p in images[:2]] + [
        str(tmp_path / "gone.png")] + [str(p) for p in images[2:]]
    assert res[2]["prediction"] is None and "not found" in res[2]["error"]
    assert all(r["prediction"] is not None for i, r in enumerate(res) if i != 2)
    assert summary["failed_rows"] == 1 and summary["count"] == 5
    capsys.readouterr()


def test_bench_infer_runs_on_cpu(tiny_model_dir, tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_infer
    finally:
        sys.path.pop(0)
    out = tmp_path / "infer.json"
    bench_infer.main(["--model", "tiny", "--rows", "16", "--batch_size", "8", "--max_new_tokens", "8",
                      "--data", str(SAMPLE_DIR / "validation.parquet"), "--fp32_rows", "0", "--serve",
                      "--concurrency", "8", "--serve_batch_size", "8", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["identical_outputs"] is True and res["identical_fraction"] == 1.0
    assert res["ratio_vs_generate"] > 0 and res["baseline"]["images_per_s"] > 0 and res["ocrtune"]["images_per_s"] > 0
    assert res["ocrtune"]["decoding"] == "fast" and res["prompt_ids_identical_fraction"] == 1.0
    assert res["serve"]["identical_outputs"] is True and res["serve"]["ocrtune"]["images_per_s"] > 0
    for key in ("seconds", "batch_size", "device", "torch", "transformers", "command"):
        assert key in res or key in res["baseline"]
    capsys.readouterr()
