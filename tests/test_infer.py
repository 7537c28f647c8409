"""`ocrtune infer`: interactive loop through a pseudo-terminal, one-shot, dataset mode, streaming,
and the one-line errors."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from ocrtune.data.registry import OCR_PROMPT
from ocrtune.infer.args import InferArgs
from samples import sample_rows, write_png

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> dict:
    """A short LoRA run with its own validation split (8 of 32 rows; 8 = 2 eval batches of 4, no wrap-around)."""
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import run_sft
    out = tmp_path_factory.mktemp("infer_run")
    return run_sft(SftArgs(model="tiny", dataset=["latex-ocr-sample#32"], dataset_test_ratio=0.25, max_steps=12, eval_steps=12,
                           batch_size=4, learning_rate=5e-3, output_dir=str(out), report_to=["none"]))


@pytest.fixture(scope="module")
def ckpt(run) -> Path:
    return Path(run["last_model_checkpoint"])


@pytest.fixture(scope="module")
def engine(ckpt):
    from ocrtune.infer.load import load_for_inference
    return load_for_inference(InferArgs(ckpt_dir=str(ckpt)))[0]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    d = tmp_path_factory.mktemp("images")
    return [write_png(r, d / f"sample{i}.png") for i, r in enumerate(sample_rows(2))]


def expected_answer(engine, image: Path, query: str = OCR_PROMPT) -> str:
    return engine.generate([{"messages": [{"role": "user", "content": "<image>" + query}], "images": [str(image)]}],
                           max_new_tokens=NEW_TOKENS)[0]


def cli_env() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", TERM="dumb")
    return env


# ---------------------------------------------------------------- loading

def test_load_reads_run_args(ckpt, engine, run):
    from ocrtune.infer.load import load_for_inference
    _, info = load_for_inference(InferArgs(ckpt_dir=str(ckpt)))
    assert info["kind"] == "lora" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["template"] == "qwen2_vl" and info["run_args"]["dataset"] == ["latex-ocr-sample#32"]
    assert hasattr(engine.model, "peft_config")
    # a run folder means its newest checkpoint
    _, info = load_for_inference(InferArgs(ckpt_dir=run["run_dir"]))
    assert info["ckpt_dir"] == str(ckpt)


def test_stream_matches_generate(engine, images):
    record = {"messages": [{"role": "user", "content": "<image>" + OCR_PROMPT}], "images": [str(images[0])]}
    pieces = list(engine.stream(record, max_new_tokens=NEW_TOKENS))
    assert len(pieces) > 1, "the answer came in one piece, not streamed"
    assert "".join(pieces).strip() == expected_answer(engine, images[0])


def test_batched_generation_matches_single(engine):
    rows = sample_rows(3)
    batched = engine.generate_rows(rows, batch_size=3, max_new_tokens=NEW_TOKENS)
    single = engine.generate_rows(rows, batch_size=1, max_new_tokens=NEW_TOKENS)
    assert batched == single
    assert len(set(batched)) > 1 or all(batched), batched


# ---------------------------------------------------------------- interactive, through a pseudo-terminal

def test_interactive_cli(ckpt, engine, images, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    first, second = expected_answer(engine, images[0]), expected_answer(engine, images[1])
    assert first, "the model answered nothing; the test could not tell a broken stream from a silent model"
    child = pexpect.spawn(sys.executable, ["-m", "ocrtune", "infer", "--ckpt_dir", str(ckpt),
                                           "--max_new_tokens", str(NEW_TOKENS)],
                          env=cli_env(), cwd=str(tmp_path), encoding="utf-8", timeout=120, echo=False)
    try:
        # 1. a query with <image>, then the path: the answer streams back, then the prompt again
        child.expect_exact("<<< ")
        child.sendline("<image>" + OCR_PROMPT)
        child.expect_exact("Input an image path or URL <<< ")
        child.sendline(str(images[0]))
        child.expect_exact(first.replace("\n", "\r\n"))
        child.expect_exact("<<< ")
        # 2. a bad path: one error line, and the loop goes on
        child.sendline("clear")
        child.expect_exact("cleared")
        child.expect_exact("<<< ")
        child.sendline("")  # empty query = the OCR prompt
        child.expect_exact("Input an image path or URL <<< ")
        child.sendline(str(tmp_path / "missing.png"))
        child.expect(r"error: image file not found: \S*missing\.png\r\n")
        child.expect_exact("<<< ")
        # 3. still alive: a second image answers as the one-shot path would
        child.sendline("")
        child.expect_exact("Input an image path or URL <<< ")
        child.sendline(str(images[1]))
        child.expect_exact(second.replace("\n", "\r\n"))
        child.expect_exact("<<< ")
        child.sendline("exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before


def test_interactive_eof_and_bad_image_file(ckpt, tmp_path, monkeypatch, capsys, engine):
    """Driven through stdin in-process: a file that is not an image, then end of input."""
    from ocrtune.infer.interactive import interactive
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    answers = iter(["", str(junk)])

    def fake_input(prompt=""):
        print(prompt, end="")
        try:
            return next(answers)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    interactive(engine, InferArgs(ckpt_dir=str(ckpt), max_new_tokens=NEW_TOKENS))
    out = capsys.readouterr()
    assert "not a readable image" in out.err and out.err.count("\n") == 1
    assert out.out.count("<<< ") == 3  # query, image, query (then end of input)


# ---------------------------------------------------------------- one-shot

def test_one_shot(ckpt, engine, images, capsys):
    from ocrtune.infer.cli import run_infer
    answer = run_infer(InferArgs(ckpt_dir=str(ckpt), image=str(images[0]), max_new_tokens=NEW_TOKENS))
    assert answer == expected_answer(engine, images[0])
    assert capsys.readouterr().out.strip() == answer


def test_one_shot_base_model_only(tiny_model_dir, images, capsys):
    from ocrtune.infer.cli import run_infer
    from ocrtune.infer.load import load_for_inference
    answer = run_infer(InferArgs(model=str(tiny_model_dir), image=str(images[0]), query="Read it.", max_new_tokens=4))
    assert capsys.readouterr().out == answer + "\n"
    engine, info = load_for_inference(InferArgs(model=str(tiny_model_dir)))
    assert info["kind"] == "base" and info["ckpt_dir"] is None and not hasattr(engine.model, "peft_config")
    record = {"messages": [{"role": "user", "content": "<image>Read it."}], "images": [str(images[0])]}
    assert answer == engine.generate([record], max_new_tokens=4)[0]


def test_cli_errors_are_one_line(ckpt, tmp_path, capsys):
    from ocrtune.cli.main import main
    cases = [
        (["infer", "--ckpt_dir", str(ckpt), "--image", str(tmp_path / "none.png")], "image file not found"),
        (["infer", "--ckpt_dir", str(tmp_path / "nope")], "does not exist"),
        (["infer", "--merge_lora", "true", "--model", "tiny"], "--merge_lora needs --ckpt_dir"),
        (["eval", "--ckpt_dir", str(ckpt), "--metrics", "bleu,wer"], "unknown metric 'wer'"),
        (["infer", "--ckpt_dir", str(ckpt), "--image", "x.png", "--load_dataset_config", "true"], "can't be combined"),
    ]
    for argv, words in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2, (argv, err)
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, (argv, err)


# ---------------------------------------------------------------- dataset mode

def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_dataset_mode_uses_the_runs_validation_split(ckpt, run, capsys):
    """--load_dataset_config rebuilds sft's own split: 8 rows, and the teacher-forced loss on them equals
    the eval_loss the trainer logged for this checkpoint."""
    from ocrtune.infer.cli import run_infer
    summary = run_infer(InferArgs(ckpt_dir=str(ckpt), load_dataset_config=True, infer_batch_size=4,
                                  max_new_tokens=NEW_TOKENS, metrics="bleu,edit_distance,exact_match,token_acc"))
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == summary
    path = Path(summary["result_path"])
    assert path.parent == ckpt / "infer_result" and path.suffix == ".jsonl"
    rows = read_jsonl(path)
    assert len(rows) == summary["count"] == 8
    assert [r["index"] for r in rows] == list(range(8))
    for r in rows:
        assert {"index", "image", "query", "reference", "prediction", "bleu4", "edit_distance_token",
                "edit_distance_char", "exact_match"} <= set(r)
        assert r["reference"] and isinstance(r["exact_match"], bool) and 0 <= r["edit_distance_token"] <= 1
    logged = [json.loads(line) for line in (Path(run["run_dir"]) / "logging.jsonl").read_text().splitlines()]
    eval_loss = [r["eval_loss"] for r in logged if "eval_loss" in r][-1]
    assert summary["loss"] == pytest.approx(eval_loss, abs=1e-4)
    assert 0 < summary["token_acc"] <= 1


def test_dataset_mode_other_data_and_bad_rows(ckpt, images, tmp_path, capsys):
    from ocrtune.infer.cli import run_infer
    data = tmp_path / "mixed.jsonl"
    lines = [{"query": "<image>" + OCR_PROMPT, "response": "x ^ { 2 }", "images": [str(images[0])]},
             {"query": "<image>" + OCR_PROMPT, "response": "y", "images": [str(tmp_path / "gone.png")]},
             {"query": "<image>" + OCR_PROMPT, "response": "z", "images": [str(images[1])]}]
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "res" / "r.jsonl"
    summary = run_infer(InferArgs(ckpt_dir=str(ckpt), dataset=[str(data)], infer_batch_size=2,
                                  max_new_tokens=NEW_TOKENS, result_path=str(out)))
    rows = read_jsonl(out)
    assert len(rows) == 3 and summary["rows"] == 3 and summary["count"] == 2 and summary["failed_rows"] == 1
    assert rows[1]["prediction"] is None and "not found" in rows[1]["error"]
    assert rows[0]["image"] == str(images[0]) and rows[0]["reference"] == "x ^ { 2 }"
    assert rows[0]["exact_match"] is False and rows[2]["prediction"] is not None
    # the registry's validation split, sampled
    summary = run_infer(InferArgs(ckpt_dir=str(ckpt), val_dataset=["latex-ocr-sample#5"], infer_batch_size=5,
                                  max_new_tokens=4, result_path=str(tmp_path / "v.jsonl")))
    assert summary["count"] == 5 and len(read_jsonl(tmp_path / "v.jsonl")) == 5
    capsys.readouterr()
