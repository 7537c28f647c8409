"""The static-KV-cache decoder (`InferEngine(decode="static")`, `ocrtune.models.static_decode`): the same
greedy tokens as plain `model.generate` in float32, the fallbacks and their reasons, and the step free of
host syncs (what a CUDA graph needs; the graph itself runs on CUDA only: bench/bench_decode.py checks it)."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from samples import mixed_prompts, stop_early, tiny_engine as engine, tiny_parts


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return mixed_prompts(8)


def plain(parts, rows, batch_size, max_new_tokens):
    slow, out = engine(parts, fast=False), []
    for s in range(0, len(rows), batch_size):
        out += slow.generate_answers(rows[s:s + batch_size], max_new_tokens)
        assert slow.last_path == "generate"
    return out


@pytest.mark.parametrize("check_every", [1, 4])
def test_static_matches_generate_with_rows_ending_early(parts, rows, stops_early, check_every):
    static = engine(parts, decode="static", check_every=check_every)
    assert static.static_reason() is None
    got = static.answer_rows(rows, batch_size=5, max_new_tokens=18)
    assert got == plain(parts, rows, 5, 18)
    assert static.last_path == "static" and static.stats["static_batches"] == 2
    assert static.stats["fast_batches"] == 0 and static.stats["generate_batches"] == 0
    assert static.stats["static_steps"] > 0 and static.stats["graph_replays"] == 0  # CPU: the step runs eagerly
    assert {a.finish_reason for a in got} == {"stop", "length"}, [(a.tokens, a.finish_reason) for a in got]
    assert any(1 < a.tokens < 18 and a.finish_reason == "stop" for a in got)


def test_static_stops_once_every_row_ended(parts, rows, stops_early):
    """A batch whose rows all stop early: decoding ends at the next check, not at max_new_tokens."""
    static = engine(parts, decode="static", check_every=1)
    short = [rows[i] for i, a in enumerate(plain(parts, rows, len(rows), 18)) if a.finish_reason == "stop"]
    assert short
    got = static.generate_answers(short, 40)
    assert got == plain(parts, short, len(short), 40)
    assert static.stats["static_steps"] == max(a.tokens for a in got) - 1  # the prefill made the first token


def test_static_matches_generate_without_stops_and_at_one_token(parts, rows):
    """Every row runs to max_new_tokens (the random model's usual case), and max_new_tokens=1 (prefill only)."""
    static = engine(parts, decode="static")
    assert static.generate_answers(rows, 12) == plain(parts, rows, len(rows), 12)
    assert static.stats["static_steps"] == 11
    assert static.generate_answers(rows[:3], 1) == plain(parts, rows[:3], 3, 1)
    assert static.last_path == "static" and static.stats["static_steps"] == 11


def test_prefill_in_parts_matches_generate(parts, rows, stops_early, monkeypatch):
    """Rows of very different prompt lengths prefilled in parts (here one part per distinct length), each part's
    keys and values copied into its rows' slots of the static cache: the same tokens as plain generate."""
    import functools

    from ocrtune.models import static_decode
    monkeypatch.setattr(static_decode, "length_parts", functools.partial(static_decode.length_parts, fixed_tokens=0))
    static = engine(parts, decode="static", check_every=2)
    got = static.generate_answers(rows, 14)
    assert got == plain(parts, rows, len(rows), 14)
    assert static.stats["prefill_parts"] == len({len(static.encode_prompt(r)["input_ids"]) for r in rows}) > 2
    assert static.last_path == "static" and static.stats["static_batches"] == 1


def test_length_parts_is_the_cheapest_split():
    """Parts are runs of the rows sorted by length; their padded tokens plus a fixed cost a part are the least of
    every such split (checked against all splits of small cases)."""
    import itertools
    import random

    from ocrtune.models.static_decode import length_parts
    assert length_parts([50, 280, 48, 270, 40], fixed_tokens=100) == [([1, 3], 280), ([0, 2, 4], 50)]
    assert length_parts([50, 280, 48], fixed_tokens=10**6) == [([1, 0, 2], 280)]
    assert [n for _, n in length_parts([7, 7, 3], fixed_tokens=0)] == [7, 3]
    rng = random.Random(0)
    for _ in range(40):
        lengths, fixed = [rng.randint(1, 60) for _ in range(rng.randint(1, 9))], rng.choice([0, 5, 40, 500])
        parts = length_parts(lengths, fixed)
        assert sorted(i for p, _ in parts for i in p) == list(range(len(lengths)))
        assert all(n == max(lengths[i] for i in p) for p, n in parts)
        cost = sum(fixed + len(p) * n for p, n in parts)
        distinct = sorted(set(lengths), reverse=True)
        for k in range(len(distinct)):
            for cuts in itertools.combinations(range(1, len(distinct)), k):
                bounds = [0, *cuts, len(distinct)]
                other = sum(fixed + sum(lengths.count(v) for v in distinct[a:b]) * distinct[a]
                            for a, b in zip(bounds, bounds[1:]))
                assert cost <= other


def test_positions_made_on_the_host_are_get_rope_index_s(parts, rows):
    """The M-RoPE positions each prompt gets when it is encoded, left-padded into a batch, are what the model's
    get_rope_index gives the batch on its real tokens (image rows and the text-only row)."""
    eng = engine(parts)
    hf = eng._hf_model()
    encoded = eng._encode_all(rows)
    assert all(e["positions"] is not None for e in encoded)
    batch = eng._batch(encoded)
    mask = batch["attention_mask"].bool()
    host, model = eng._positions(hf, encoded, batch), eng._prompt_positions(hf, batch)
    assert host.shape == model.shape and torch.equal(host[:, mask], model[:, mask]) and (~mask).any()


def test_eager_attention_matches_generate(parts, rows):
    model = parts[0]
    model.set_attn_implementation("eager")
    try:
        static = engine(parts, decode="static")
        assert static.static_reason() is None
        assert static.generate_answers(rows[:4], 8) == plain(parts, rows[:4], 4, 8)
        assert static.last_path == "static"
    finally:
        model.set_attn_implementation("sdpa")


def test_auto_is_static_on_cuda(parts, monkeypatch):
    """`--decode auto` picks the static decoder on a GPU; `--decode dynamic` keeps the dynamic loop there."""
    auto, dynamic = engine(parts), engine(parts, decode="dynamic")
    monkeypatch.setattr(type(auto), "device", property(lambda self: torch.device("cuda")))
    assert auto.static_reason() is None
    assert dynamic.static_reason() == "decode='dynamic'"


def test_auto_and_dynamic_keep_the_dynamic_loop_on_the_cpu(parts, rows):
    auto, dynamic = engine(parts), engine(parts, decode="dynamic")
    assert "decode='auto' on the CPU" in auto.static_reason()
    assert dynamic.static_reason() == "decode='dynamic'"
    for e in (auto, dynamic):
        e.generate_answers(rows[:3], 4)
        assert e.last_path == "fast" and e.stats["static_batches"] == 0
    with pytest.raises(ValueError, match="decode must be one of"):
        engine(parts, decode="graphs")


def test_what_the_static_decoder_cannot_do_takes_another_path(parts, rows):
    model = parts[0]
    static = engine(parts, decode="static")
    assert engine(parts, decode="static", fast=False).static_reason() == "fast=False"
    assert static.static_reason(temperature=0.7) == "sampling"
    assert static.static_reason(num_beams=3) == "beam search"
    static.generate_answers(rows[:2], 4, num_beams=2)
    assert static.last_path == "generate" and static.stats["static_batches"] == 0
    model.generation_config.repetition_penalty = 1.5
    try:
        assert "repetition_penalty=1.5" in static.static_reason()
        assert static.fast_reason() is None  # the dynamic loop reproduces it
        assert static.generate_answers(rows[:4], 8) == plain(parts, rows[:4], 4, 8)
        assert static.last_path == "fast" and static.stats["static_batches"] == 0
    finally:
        model.generation_config.repetition_penalty = 1.0


def test_model_reasons():
    from ocrtune.models import static_decode

    def fake(attn="sdpa", layer_types=("full_attention",)):
        cfg = SimpleNamespace(_attn_implementation=attn, layer_types=list(layer_types))
        return SimpleNamespace(config=cfg, model=SimpleNamespace(language_model=SimpleNamespace(config=cfg)),
                               lm_head=object(),
                               generation_config=SimpleNamespace(repetition_penalty=1.0))

    assert static_decode.model_reason(fake()) is None
    assert static_decode.model_reason(fake("ocrtune_varlen")) is None  # sdpa save for packed training rows
    assert "'flash_attention_2'" in static_decode.model_reason(fake("flash_attention_2"))
    assert "sliding_attention" in static_decode.model_reason(fake(layer_types=("full_attention", "sliding_attention")))
    no_lm = fake()
    no_lm.model = SimpleNamespace()
    assert "no model.language_model" in static_decode.model_reason(no_lm)
    split = fake()
    split.hf_device_map = {"model.visual": 0, "model.language_model.layers.0": 0, "model.language_model.layers.1": 1}
    assert static_decode.model_reason(split) == "the model is split over devices ['0', '1'] (device_map)"
    whole = fake()
    whole.hf_device_map = {"": 1}
    assert static_decode.model_reason(whole) is None


def test_the_warm_up_is_ordered_with_the_model_devices_stream(monkeypatch):
    """The model may sit on a device other than the current one: the warm-up must wait for, and be waited for by,
    that device's current stream (the current device's stream orders nothing there). CPU: CUDA calls are faked."""
    import contextlib

    from ocrtune.models import static_decode
    log, model_device = [], torch.device("cuda", 1)

    def current_stream(device=None):
        log.append(("current_stream", device))
        return SimpleNamespace(name=f"current of {device}", wait_stream=lambda s: log.append(("current waits", s.name)))

    side = SimpleNamespace(name="side", device=model_device, wait_stream=lambda s: log.append(("side waits", s.name)))
    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    static_decode._on_stream(side, lambda: log.append("step"))
    assert log == [("current_stream", model_device), ("side waits", f"current of {model_device}"), "step",
                   ("current waits", "side")]


def test_a_failing_static_decoder_hands_the_batch_to_the_dynamic_loop(parts, rows, monkeypatch, caplog):
    from ocrtune.models import static_decode
    calls = []

    def broken(*args, **kw):
        calls.append(1)
        raise static_decode.GraphCaptureError("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(static_decode, "decode", broken)
    static = engine(parts, decode="static")
    with caplog.at_level(logging.WARNING, logger="ocrtune"):
        got = static.generate_answers(rows[:4], 6)
    assert got == plain(parts, rows[:4], 4, 6) and static.last_path == "fast"
    reason = static.static_reason()
    assert reason.startswith("the static decoder failed (GraphCaptureError: RuntimeError: operation not permitted")
    assert "decoding with the dynamic loop from now on" in caplog.text
    static.generate_answers(rows[:2], 3)
    assert len(calls) == 1 and static.last_path == "fast"  # off for good, not tried on every batch


def test_a_batch_that_fails_on_every_path_leaves_the_static_decoder_on(parts, rows, monkeypatch):
    """A batch the model itself refuses (it fails in the dynamic loop too) says nothing about the static decoder:
    it stays on for the next batches (in `ocrtune serve`, one bad request turned it off for the server's life)."""
    from ocrtune.models import static_decode
    from ocrtune.models.generate import InferEngine
    real_decode, real_greedy = static_decode.decode, InferEngine._greedy
    calls = []

    def refuse(hf, batch, *a, **kw):
        calls.append(batch["input_ids"].shape[0])
        if batch["input_ids"].shape[0] == 1:
            raise ValueError("Image features and image tokens do not match")
        return real_decode(hf, batch, *a, **kw)

    def greedy(self, batch, *a, **kw):
        if batch["input_ids"].shape[0] == 1:
            raise ValueError("Image features and image tokens do not match")
        return real_greedy(self, batch, *a, **kw)

    monkeypatch.setattr(static_decode, "decode", refuse)
    monkeypatch.setattr(InferEngine, "_greedy", greedy)
    static = engine(parts, decode="static")
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        static.generate_answers(rows[:1], 4)
    assert static.static_reason() is None
    assert static.generate_answers(rows[:2], 4) == plain(parts, rows[:2], 2, 4)
    assert static.last_path == "static" and calls == [1, 2]


def test_a_batch_whose_static_cache_does_not_fit_decodes_on_the_dynamic_loop(parts, rows, monkeypatch, caplog):
    """The static cache is allocated for prompt + max_new_tokens of every row at once; out of memory there, the batch
    decodes on the dynamic loop (which grows with the answers) and the static decoder stays on for the next one."""
    from ocrtune.models import static_decode
    real_decode = static_decode.decode

    def oom_for_long(hf, batch, positions, max_new_tokens, *a, **kw):
        if max_new_tokens > 8:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_decode(hf, batch, positions, max_new_tokens, *a, **kw)

    monkeypatch.setattr(static_decode, "decode", oom_for_long)
    static = engine(parts, decode="static")
    with caplog.at_level(logging.WARNING, logger="ocrtune"):
        got = static.generate_answers(rows[:3], 12)
    assert got == plain(parts, rows[:3], 3, 12) and static.last_path == "fast"
    assert static.stats["static_oom"] == 1 and static.static_reason() is None
    assert "the static decoder ran out of memory (its KV cache is allocated for 3 rows x " in caplog.text
    static.generate_answers(rows[:3], 4)
    assert static.last_path == "static"


def test_the_decoding_step_never_syncs_with_the_host(parts, rows, monkeypatch):
    """A CUDA graph can't hold a host sync or a host-to-device copy: the step (all but the prefill and the
    every-`check_every` stop check) must read no tensor value back and make no tensor from host data.
    Spied on the CPU at both levels: Tensor's Python readers, and the aten ops the step dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ocrtune.models import static_decode
    reads, ops = [], set()
    in_step = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _orig=original, **k):
            if in_step:
                reads.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    step_call = static_decode.Step.__call__

    def watched(self):
        in_step.append(1)
        try:
            with Ops():
                step_call(self)
        finally:
            in_step.pop()

    monkeypatch.setattr(static_decode.Step, "__call__", watched)
    static = engine(parts, decode="static", check_every=4)
    static.generate_answers(rows[:3], 6)
    assert static.stats["static_steps"] == 5 and reads == []
    syncing = {"_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "lift_fresh", "unique",
               "_unique2", "repeat_interleave", "_assert_async", "equal"}
    assert "index_copy_" in ops and "argmax" in ops and not ops & syncing, sorted(ops & syncing)


def test_decoding_steps_read_grouped_kv_heads_once(parts, rows, monkeypatch):
    """On an sdpa model the step packs the query heads of each K/V head into its query rows (no repeat_kv
    copy), the prefill keeps transformers' sdpa, and the model's attention setting is back after each step."""
    import torch.nn.functional as F
    model = parts[0]
    text = model.model.language_model.config
    groups = text.num_attention_heads // text.num_key_value_heads
    assert groups > 1  # the tiny preset has grouped K/V heads
    seen, original = [], F.scaled_dot_product_attention

    def spy(query, key, value, *a, **k):
        seen.append((tuple(query.shape[1:3]), key.shape[1], text._attn_implementation))
        return original(query, key, value, *a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    static = engine(parts, decode="static")
    got = static.generate_answers(rows[:3], 4)
    steps = [x for x in seen if x[2] == "ocrtune_decode"]
    assert len(steps) == 3 * text.num_hidden_layers  # 3 decoding steps, every layer
    assert {x[0] for x in steps} == {(text.num_key_value_heads, groups)} and {x[1] for x in steps} == {
        text.num_key_value_heads}
    assert text._attn_implementation == "sdpa" and got == plain(parts, rows[:3], 3, 4)


def test_decode_flag_reaches_the_engine(tiny_model_dir):
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.load import load_for_inference
    from ocrtune.serve.args import ServeArgs
    engine, _ = load_for_inference(InferArgs(model=str(tiny_model_dir), decode="static"))
    assert engine.decode_mode == "static" and engine.static_reason() is None
    assert InferArgs().decode == "auto" and ServeArgs().decode == "auto"


def test_bench_decode_runs_on_cpu_without_peft_or_datasets(tiny_model_dir, tmp_path, capsys):
    """The GPU benchmark's smoke run: the three decoders on the tiny model, the float32 check, the JSON, and
    no import of peft or datasets (the GPU machine has neither: the benchmark makes such an import fail)."""
    import json
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import bench_decode
    finally:
        sys.path.remove(str(bench))
    out = tmp_path / "decode.json"
    bench_decode.main(["--model", "tiny", "--rows", "6", "--batch_size", "3", "--max_new_tokens", "4",
                       "--fp32_rows", "3", "--workers", "0", "--memory_batches", "3", "--out", str(out)])
    res = json.loads(out.read_text())
    only, e2e = res["model_only"], res["end_to_end"]
    # model only: each path once untimed (the batch's first allocations), then timed: two batches each
    assert only["static"]["decoding"] == "static" and only["static"]["stats"]["static_batches"] == 2
    assert only["dynamic"]["decoding"] == "fast" and only["static"]["identical_outputs"] is True
    assert all(only[p]["cold_seconds"] > 0 for p in ("generate", "dynamic", "static"))
    assert e2e["static"]["stats"]["static_batches"] == 2 and e2e["static"]["identical_outputs"] is True
    assert only["generate"]["tokens_per_s"] > 0 and res["model_only_speedup"] > 0 and res["end_to_end_speedup"] > 0
    assert res["fp32_identical"] is True and res["fp32"]["static_graph_vs_eager"]["identical_outputs"] is True
    assert res["skipped"] == [] and res["device"] == "cpu"
    assert res["memory_batches"] == {"batches": 3, "decoding": "static", "graph_replays": 0, "allocated_mib": None,
                                     "reserved_mib_max": None, "allocated_growth_mib": None}
    capsys.readouterr()


def test_bench_float32_check_gives_the_model_back_in_its_dtypes(tiny_model_dir, rows):
    """The benchmark's float32 check casts the model to float32 and back: every tensor must get its own dtype back
    (a bf16 model keeps its rotary inv_freq in float32; `model.to(bf16)` rounded it, and the timings after it)."""
    import sys
    from pathlib import Path

    from ocrtune.models.loading import load_model, load_processor
    from ocrtune.models.template import Template
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import bench_decode
    finally:
        sys.path.remove(str(bench))
    processor = load_processor(tiny_model_dir)
    model = load_model(tiny_model_dir, torch.bfloat16).eval()
    before = {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]}
    assert torch.float32 in before.values() and torch.bfloat16 in before.values()
    template = Template(processor, "qwen2_vl")
    from ocrtune.models.generate import InferEngine
    encoded = InferEngine(model, processor, template, workers=0)._encode_all(rows[:2])
    res = bench_decode.fp32(SimpleNamespace(max_new_tokens=2, check_every=4), model, processor, template, encoded,
                            torch.device("cpu"))
    assert "error" not in res and res["static"]["identical_outputs"] is True
    assert {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()]} == before


def test_bench_forbids_peft_and_datasets_imports():
    import importlib
    import sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        import bench_decode
    finally:
        sys.path.remove(str(bench))
    undo = bench_decode.forbid({"peft", "datasets"})
    try:
        with pytest.raises(ImportError, match="must not import peft "):
            importlib.import_module("peft.tuners")
        assert importlib.import_module("json")  # others import as usual
    finally:
        undo()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the graph path)")
@pytest.mark.parametrize("check_every", [1, 4])
def test_cuda_graph_replays_give_the_eager_steps_and_generates_tokens(tiny_model_dir, rows, check_every):
    """On CUDA, float32: the replayed graph == the same step run eagerly == plain generate, rows ending early."""
    from ocrtune.models.generate import InferEngine
    parts = tiny_parts(tiny_model_dir, "cuda")
    stop_early(*parts[:2])  # as the fixture stops_early (captured into the graph too)
    graph = InferEngine(*parts, workers=0, check_every=check_every, decode="static")  # graphs on CUDA
    eager = InferEngine(*parts, workers=0, check_every=check_every, decode="static", cuda_graphs=False)
    got = graph.answer_rows(rows, batch_size=5, max_new_tokens=18)
    assert graph.last_path == "static-graph" and graph.stats["graph_replays"] > 0, graph.static_reason()
    assert got == eager.answer_rows(rows, batch_size=5, max_new_tokens=18) and eager.last_path == "static"
    assert got == plain(parts, rows, 5, 18)
    assert {a.finish_reason for a in got} == {"stop", "length"}


def test_sampling_never_emits_an_image_placeholder(parts, rows):
    """Sampled answers never hold a vision token (GRPO feeds them back: an <|image_pad|> there is an image with no
    pixels), even where the model puts nearly all its mass on one; greedy decoding is left as generate's."""
    model, processor, _ = parts
    eng = engine(parts)
    vision = eng.vision_token_ids()
    assert sorted(vision) == sorted(processor.tokenizer.convert_tokens_to_ids(
        ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]))

    def favour_vision(module, inputs, out):
        out = out.clone()
        out[..., vision] += 30.0
        return out

    handle = model.lm_head.register_forward_hook(favour_vision)
    try:
        torch.manual_seed(0)
        answers = eng.generate_answers(rows[:3], 6, temperature=1.0)
        greedy = eng._gen_kwargs(6)
    finally:
        handle.remove()
    assert all(a.ids and not set(a.ids) & set(vision) for a in answers)
    assert "suppress_tokens" not in greedy


def test_decode_static_with_sampling_says_how_it_decodes(tiny_model_dir, capsys):
    """--decode static with --temperature or --num_beams: one note on stderr that those decode with generate."""
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.load import load_for_inference
    for kw in ({"temperature": 0.7}, {"num_beams": 2}, {}):
        load_for_inference(InferArgs(model=str(tiny_model_dir), decode="static", **kw))
        err = capsys.readouterr().err
        assert ("note: --decode static decodes greedy batches" in err) == bool(kw), (kw, err)
