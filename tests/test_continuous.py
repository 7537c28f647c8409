"""Continuous batching (`ocrtune/models/continuous.py`): prompts that join a batch already decoding get, in float32,
the tokens they get decoded alone; each row ends at its own stop token or max_new_tokens; a prompt that fails to
encode fails alone."""
from __future__ import annotations

import pytest
import torch

from samples import mixed_prompts, tiny_engine as engine


def run_continuous(eng, arrivals: list[list[tuple]], max_rows: int):
    """Decode with `arrivals[i]` offered at the i-th call of take (what a server's queue holds then)."""
    from ocrtune.models.continuous import ContinuousDecoder
    got, asked, queue = {}, [], []

    def take(free):
        asked.append(free)
        queue.extend(arrivals.pop(0) if arrivals else [])
        given = queue[:free]
        del queue[:free]
        return given

    decoder = ContinuousDecoder(eng)
    decoder.run(take, lambda key, answer: got.__setitem__(key, answer), max_rows)
    assert not queue and not arrivals
    return got, asked, decoder.stats


DECODES = ["dynamic", "static"]  # static: the slots on the static KV cache (run eagerly on the CPU)


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("check_every", [1, 3])
def test_rows_joining_a_running_batch_get_their_own_greedy_answers(parts, stops_early, check_every, decode):
    eng = engine(parts, check_every=check_every, decode=decode)
    rows = mixed_prompts(8)
    limits = [12, 20, 7, 20, 16, 20, 9, 20, 14]
    alone = [eng.generate_answers([r], max_new_tokens=m)[0] for r, m in zip(rows, limits)]
    items = [(i, r, m) for i, (r, m) in enumerate(zip(rows, limits))]
    # three rows first, then two at the next check, nothing, then the rest (as far as room allows)
    arrivals = [items[:3], items[3:5], [], items[5:]]
    got, asked, stats = run_continuous(eng, arrivals, max_rows=6)
    assert sorted(got) == list(range(len(rows)))
    for i, want in enumerate(alone):
        assert got[i] == want, (i, got[i], want)
    assert {a.finish_reason for a in got.values()} == {"stop", "length"}
    assert all(got[i].tokens <= limits[i] for i in got)
    assert stats["joins"] >= 3 and stats["max_rows"] <= 6 and all(f <= 6 for f in asked)
    assert (stats.get("rebuilds", 0) >= 1) == (decode == "static")


def test_slots_grow_for_long_prompts_and_answers_and_keep_the_rows_they_hold(parts):
    """The static slots' cache is rebuilt when a joining prompt is longer than the columns left of the current one
    or its answer longer than the room right of it: the rows decoding through a rebuild keep their answers."""
    eng = engine(parts, check_every=2, decode="static")
    rows = mixed_prompts(8)
    by_length = sorted(range(len(rows)), key=lambda i: len(eng.encode_prompt(rows[i])["input_ids"]))
    short, long_ = by_length[0], by_length[-1]
    plan = [(short, 3), (by_length[1], 40), (long_, 6), (short, 90), (by_length[2], 5)]
    items = [(k, rows[i], m) for k, (i, m) in enumerate(plan)]
    alone = {k: eng.generate_answers([rows[i]], max_new_tokens=m)[0] for k, (i, m) in enumerate(plan)}
    got, _, stats = run_continuous(eng, [items[:2], [], items[2:3], [], [], items[3:]], max_rows=3)
    assert got == alone
    assert stats["rebuilds"] >= 2  # the first prompt's cache, then the longer prompt (and the 90-token answer)


def test_slots_decode_on_eagerly_when_the_graph_capture_fails(parts, stops_early, monkeypatch, caplog):
    """A capture that fails after its warm-up step ran (the CUDA path: one eager step, then the capture) leaves the
    slots decoding eagerly from the next column: every row, live through it or joining later, gets its own answer."""
    import logging

    from ocrtune.models import static_decode
    eng = engine(parts, check_every=4, decode="static")
    rows = mixed_prompts(6)
    limits = [30, 9, 25, 6, 20, 12, 28]
    alone = [eng.generate_answers([r], max_new_tokens=m)[0] for r, m in zip(rows, limits)]
    call = static_decode.Replayer.__call__
    failed = []

    def capture_fails(self, capture=True):
        if not failed:
            self.step()
            failed.append(1)
            raise static_decode.GraphCaptureError("capture refused")
        return call(self, capture)
    monkeypatch.setattr(static_decode.Replayer, "__call__", capture_fails)
    items = [(i, r, m) for i, (r, m) in enumerate(zip(rows, limits))]
    with caplog.at_level(logging.WARNING, logger="ocrtune"):
        got, _, _ = run_continuous(eng, [items[:2], [], items[2:4], [], items[4:]], max_rows=3)
    assert failed and [got[i] for i in range(len(rows))] == alone
    assert "decoding it eagerly" in caplog.text


def test_slots_take_new_rows_in_groups(parts, stops_early):
    """On the static cache new rows are taken once `min_join` slots are free (or none is live), not one by one as
    rows end; every row still gets its own answer."""
    from ocrtune.models.continuous import ContinuousDecoder
    eng = engine(parts, check_every=1, decode="static")
    rows = mixed_prompts(8)
    alone = [eng.generate_answers([r], max_new_tokens=24)[0] for r in rows]
    asked = {}
    for group in (1, 3):
        got, queue, asked[group] = {}, [(i, r, 24) for i, r in enumerate(rows)], []

        def take(free):
            asked[group].append(free)
            given = queue[:free]
            del queue[:free]
            return given
        ContinuousDecoder(eng, min_join=group).run(take, lambda key, answer: got.__setitem__(key, answer), 4)
        assert [got[i] for i in range(len(rows))] == alone
    assert min(asked[3]) >= 3 and min(asked[1]) < 3  # one by one without grouping (rows end at different steps)


def test_slots_fall_back_to_a_cache_without_room_to_spare_when_memory_is_short(parts, monkeypatch):
    """A static cache with room for one more answer that does not fit the card is made exactly as long as the rows
    need; where that does not fit either, the joining rows fail with the error."""
    from ocrtune.models import continuous_static
    eng = engine(parts, check_every=2, decode="static")
    rows = mixed_prompts(4)
    build, lengths, limit = continuous_static._Slots._build, [], {"max": 10**9}

    def short_memory(self, length, col, span):
        lengths.append(length)
        if length > limit["max"]:
            raise torch.OutOfMemoryError("no room")
        return build(self, length, col, span)
    monkeypatch.setattr(continuous_static._Slots, "_build", short_memory)
    alone = eng.generate_answers([rows[0]], max_new_tokens=12)[0]
    limit["max"] = len(eng.encode_prompt(rows[0])["input_ids"]) + 12  # the exact need fits, the spare room not
    got, _, stats = run_continuous(eng, [[(0, rows[0], 12)]], max_rows=2)
    assert got[0] == alone and lengths[-2] > limit["max"] >= lengths[-1]
    limit["max"] = 0  # nothing fits: the row fails
    got, _, _ = run_continuous(eng, [[(0, rows[0], 12)]], max_rows=2)
    assert isinstance(got[0], torch.OutOfMemoryError)


@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("decode", DECODES)
def test_a_batch_that_fails_to_step_fails_its_rows_and_serving_goes_on(parts, decode, check_every, monkeypatch):
    """A decoding step that raises (out of memory, say) fails the rows it held, between two checks too; rows taken
    afterwards decode."""
    from ocrtune.models import static_decode
    eng = engine(parts, check_every=check_every, decode=decode)
    rows = mixed_prompts(4)
    calls = {"n": 0}
    if decode == "static":
        step_call = static_decode.Step.__call__

        def flaky(self):
            calls["n"] += 1
            if calls["n"] == 2:
                arrivals.append([(2, rows[2], 4)])  # the next request, taken after the failure
                raise torch.OutOfMemoryError("no room")
            return step_call(self)
        monkeypatch.setattr(static_decode.Step, "__call__", flaky)
    else:
        from ocrtune.models import continuous
        batch_step = continuous._Batch.step

        def flaky(self, hf, stops):
            calls["n"] += 1
            if calls["n"] == 2:
                arrivals.append([(2, rows[2], 4)])
                raise torch.OutOfMemoryError("no room")
            return batch_step(self, hf, stops)
        monkeypatch.setattr(continuous._Batch, "step", flaky)
    arrivals = [[(0, rows[0], 10), (1, rows[1], 10)]]
    got, _, _ = run_continuous(eng, arrivals, max_rows=4)
    assert isinstance(got[0], torch.OutOfMemoryError) and isinstance(got[1], torch.OutOfMemoryError)
    monkeypatch.undo()
    assert got[2] == eng.generate_answers([rows[2]], max_new_tokens=4)[0]


@pytest.mark.parametrize("decode", DECODES)
def test_rows_ended_are_handed_back_while_others_decode(parts, stops_early, decode):
    eng = engine(parts, check_every=1, decode=decode)
    rows = mixed_prompts(4)
    order = []
    from ocrtune.models.continuous import ContinuousDecoder
    items = [(0, rows[0], 2), (1, rows[1], 30)]
    ContinuousDecoder(eng).run(lambda free: [items.pop(0)] if items else [],
                               lambda key, answer: order.append((key, answer.tokens)), max_rows=4)
    # the 2-token row came back first, long before the other ended
    assert order[0] == (0, 2) and order[1][0] == 1


@pytest.mark.parametrize("decode", DECODES)
def test_a_prompt_that_fails_to_encode_fails_alone(parts, tmp_path, decode):
    eng = engine(parts, decode=decode)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    rows = mixed_prompts(4)
    items = [(0, rows[0], 5), (1, {"messages": [{"role": "user", "content": "<image>read"}], "images": [str(bad)]}, 5),
             (2, rows[2], 5)]
    got, _, _ = run_continuous(eng, [items], max_rows=8)
    assert isinstance(got[1], BaseException)
    assert got[0] == eng.generate_answers([rows[0]], max_new_tokens=5)[0]
    assert got[2] == eng.generate_answers([rows[2]], max_new_tokens=5)[0]


def test_reason_names_what_keeps_it_off(parts):
    from ocrtune.models.continuous import reason
    from ocrtune.models.generate import InferEngine
    model, processor, template = parts
    assert reason(InferEngine(model, processor, template, workers=0)) is None
    assert reason(InferEngine(model, processor, template, workers=0, fast=False)) == "fast=False"


@pytest.mark.parametrize("decode", DECODES)
def test_the_server_batcher_lets_late_requests_join_and_answers_each_as_it_ends(parts, stops_early, decode):
    """`serve`'s batcher: requests sent while a batch decodes join it (one decoding session, several joins), every
    answer is the row's own greedy answer, and a short answer is not held back by a long one."""
    import asyncio
    import time

    from ocrtune.serve.batching import Batcher
    eng = engine(parts, check_every=1, decode=decode)
    rows = mixed_prompts(6)
    limits = [40, 3, 25, 2, 30, 5]
    records = [eng.encode_prompt(r) for r in rows]
    alone = [eng.generate_answers([r], max_new_tokens=m)[0] for r, m in zip(records, limits)]

    async def main():
        batcher = Batcher(eng, max_batch_size=4, wait_s=0.0)
        batcher.start()
        done_at = {}

        async def one(i):
            answer = await batcher.generate(records[i], limits[i])
            done_at[i] = time.monotonic()
            return answer
        first = [asyncio.create_task(one(i)) for i in (0, 1)]
        while batcher.continuous.stats["steps"] < 2:  # the first batch is decoding
            await asyncio.sleep(0.001)
        late = [asyncio.create_task(one(i)) for i in (2, 3, 4, 5)]
        answers = await asyncio.gather(*first, *late)
        snapshot = batcher.snapshot()
        await batcher.stop()
        return answers, done_at, snapshot

    answers, done_at, snapshot = asyncio.run(main())
    assert answers == [alone[i] for i in (0, 1, 2, 3, 4, 5)]
    assert snapshot["continuous"] and snapshot["requests"] == 6 and snapshot["errors"] == 0
    assert snapshot["batches"] >= 2 and 1 < snapshot["max_batch_size_seen"] <= 4  # joins of one session
    assert done_at[3] < done_at[0]  # the 2-token request, sent late, ended before the first long one



@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the graph path)")
def test_cuda_slots_replay_graphs_and_give_each_row_its_own_answer(tiny_model_dir):
    """On CUDA, float32: the slots' step replayed as a CUDA graph, through joins and a rebuild, gives every row the
    answer it gets decoded alone."""
    from samples import stop_early, tiny_parts
    parts = tiny_parts(tiny_model_dir, "cuda")
    handle = stop_early(*parts[:2])
    try:
        eng = engine(parts, check_every=2)  # decode="auto": the static slots on CUDA
        rows = mixed_prompts(8)
        limits = [12, 40, 7, 20, 16, 30, 9, 20, 14]
        alone = [eng.generate_answers([r], max_new_tokens=m)[0] for r, m in zip(rows, limits)]
        items = [(i, r, m) for i, (r, m) in enumerate(zip(rows, limits))]
        got, _, stats = run_continuous(eng, [items[:3], [], items[3:5], [], [], items[5:]], max_rows=4)
        assert [got[i] for i in range(len(rows))] == alone
        assert stats["graph_replays"] > 0 and stats["rebuilds"] >= 1 and stats["joins"] >= 3
    finally:
        handle.remove()


def test_serve_prepares_prompts_with_their_positions(parts):
    """serve's request preparation (outside the model thread) makes each prompt's M-RoPE positions too: what the
    model's get_rope_index gives the prompt, so the decoders never compute them on the device."""
    import base64

    from samples import sample_rows

    from ocrtune.serve.protocol import Limits, parse_chat_request
    from ocrtune.serve.service import Prep
    eng = engine(parts)
    png = sample_rows(1)[0]["images"][0]["bytes"]
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Read it."}]}]}
    enc = Prep(eng, 10**7).prepare(parse_chat_request(body, Limits()))
    hf = eng._hf_model()
    ids = torch.as_tensor(enc["input_ids"])[None]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_grid_thw": enc["image_grid_thw"],
             "mm_token_type_ids": torch.as_tensor(enc["mm_token_type_ids"])[None]}
    assert enc["positions"] is not None and torch.equal(enc["positions"], eng._prompt_positions(hf, batch)[:, 0])
    assert enc["positions"].shape == (3, ids.shape[1]) and not torch.equal(enc["positions"][1], enc["positions"][2])
