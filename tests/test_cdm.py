"""The cdm metric (Character Detection Matching): spellings that render alike score 1, each wrong, missing or
misplaced character costs what the F1 says, what does not compile scores 0, it is fast in bulk, and
`ocrtune eval --metrics cdm` reports it (or fails at once without pdflatex)."""
from __future__ import annotations

import json
import os
import resource
import shutil
import time

import pytest

from ocrtune.errors import UserError
from ocrtune.evaluate import cdm
from ocrtune.evaluate.cdm import cdm_scores, cdm_summary, compiles

needs_tex = pytest.mark.skipif(shutil.which("pdflatex") is None and not os.environ.get("OCRTUNE_TEX_ROOT"),
                               reason="pdflatex is not installed (apt-get install texlive-latex-base)")

SAME_RENDER = [("x^2", "x^{2}"), (r"\frac{a}{b}", r"\frac a b"), ("a  +   b = c", "a+b=c"), (r"\left(x\right)", "(x)"),
               (r"\sum_{i=1}^{n} x_{i}", r"\sum _ { i = 1 } ^ n x _ i"), (r"\sqrt{x+1}", r"\sqrt { x + 1 }"),
               (r"\alpha \leq \beta", r"\alpha\le\beta"), (r"{a}_{b}^{c}", r"a^c_b")]


@needs_tex
def test_spellings_that_render_alike_score_1():
    preds, refs = zip(*SAME_RENDER)
    assert cdm_scores(preds, refs) == [1.0] * len(SAME_RENDER)
    # a different size of the same delimiter is the same character, as in the reference's token rules
    assert cdm_scores([r"\left( \frac{a}{b} \right)"], [r"\Big( \frac{a}{b} \Big)"]) == [1.0]


@needs_tex
def test_a_wrong_symbol_costs_what_the_f1_says():
    # 9 glyphs each, 8 the same: F1 = 2 * 8 / 18
    assert cdm_scores(["a+b+c+d=f"], ["a+b+c+d=e"]) == [pytest.approx(16 / 18)]
    # a, b and the fraction bar against a, c and the bar: 2 of 3 match
    assert cdm_scores([r"\frac{a}{c}"], [r"\frac{a}{b}"]) == [pytest.approx(4 / 6)]
    # one glyph too many: 4 of 4 reference glyphs found among 5
    assert cdm_scores([r"\alpha \beta \gamma \delta x"], [r"\alpha \beta \gamma \delta"]) == [pytest.approx(8 / 9)]


@needs_tex
def test_a_swapped_pair_is_penalised():
    # the swapped characters sit where no translation of the rest puts them
    assert cdm_scores(["b+a", "a+c+b+d"], ["a+b", "a+b+c+d"]) == [pytest.approx(2 / 6), pytest.approx(10 / 14)]
    # a numerator is not a denominator: a and b are apart, only the bar is where it was
    assert cdm_scores([r"\frac{b}{a}"], [r"\frac{a}{b}"]) == [pytest.approx(2 / 6)]
    # the reference's tolerance (20 px at 200 dpi: 7.2 pt, more than a script's move from above the line to
    # below it, 6.8 pt here) cannot tell a subscript from a superscript
    assert cdm_scores([r"x_{a+b}+y_{c+d}", "x_2"], [r"x^{a+b}+y_{c+d}", "x^2"]) == [1.0, 1.0]
    # a missing block shifts the rest as one: both parts still match (9 of 9 reference glyphs among 11)
    assert cdm_scores(["x+y+z=1+2+3"], ["x+z=1+2+3"]) == [pytest.approx(18 / 20)]


@needs_tex
def test_what_does_not_compile_or_is_blank_scores_0():
    preds = [r"\frac{a}{b", r"x \undefinedmacro", r"\input{/etc/passwd}", "", "   ", None, "", "x"]
    refs = ["a", "x", "x", "a", "a", "a", "", r"\undefinedmacro"]
    # last two: two blank formulas agree; a reference that does not compile is matched only by its own text
    assert cdm_scores(preds, refs) == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert cdm_scores([r"\undefinedmacro"], [r"\undefinedmacro"]) == [1.0]
    assert cdm_scores([], []) == []
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        cdm_scores(["a", "b"], ["a"])


@needs_tex
def test_compiles():
    got = compiles(["x^2", r"\frac{a}{b", r"x \undefinedmacro", "", r"\mathbb{R}", r"\begin{array}{c} a \end{array}",
                    r"\write18{ls}"])
    assert got == [True, False, False, False, True, True, False]


@needs_tex
def test_compute_metrics_takes_cdm():
    from ocrtune.evaluate.metrics import compute_metrics
    out = compute_metrics(["x^{2}", "a+b", ""], ["x^2", "a+c", "y"], "cdm,exact_match")
    assert out == {"exact_match": 0.0, "cdm": pytest.approx((1 + 2 / 3 + 0) / 3), "exprate_cdm": pytest.approx(1 / 3),
                   "count": 3}


def test_summary():
    assert cdm_summary([1.0, 0.5, 0.0, 1.0]) == {"cdm": 0.625, "exprate_cdm": 0.5}
    assert cdm_summary([]) == {"cdm": 0.0, "exprate_cdm": 0.0}


def test_the_hungarian_assignment_is_optimal():
    import itertools

    import numpy as np
    rng = np.random.default_rng(1)
    for n, m in [(2, 2), (4, 7), (5, 5), (3, 9)]:
        cost = rng.random((n, m))
        pairs = cdm._assign(cost)
        best = min(sum(cost[i, c] for i, c in enumerate(cols)) for cols in itertools.permutations(range(m), n))
        assert len({j for _, j in pairs}) == n and sum(cost[i, j] for i, j in pairs) == pytest.approx(best)


def test_ransac_keeps_the_best_trials_inliers():
    """skimage's ransac (the reference's) returns the best two-pair model's inliers; refitting one scale on all of
    them and taking that fit's inliers instead (as before) put 2 of these 5 pairs out again, though a two-pair model
    within the tolerance of all 5 exists."""
    import numpy as np
    src = np.array([[19.9, 21.2], [31.4, 16.6], [29.4, 28.4], [37.3, 4.6], [29.2, 37.1]])
    dst = np.array([[28.3, 19.8], [39.3, 14.4], [25.7, 29.6], [42.5, 5.4], [26.3, 30.4]])
    assert cdm._ransac(src, dst, np.random.default_rng(0)).tolist() == [True] * 5


@needs_tex
def test_200_rows_take_well_under_a_few_seconds():
    """Measured: ~1,000 rows (2,000 formulas) per 3-4 CPU seconds; the bound allows for a loaded machine."""
    import pyarrow.parquet as pq

    from ocrtune.data.registry import SAMPLE_DIR
    refs = (pq.read_table(SAMPLE_DIR / "train.parquet", columns=["text"]).column("text").to_pylist() * 2)[:200]
    preds = [r.replace("2", "3") + " " * i for i, r in enumerate(refs)]  # all distinct: nothing cached
    cdm.check_tex()
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    scores = cdm_scores(preds, refs, processes=1)
    wall = time.time() - t0
    cpu = sum(getattr(resource.getrusage(who), f) - getattr(then, f)
              for who, then in ((resource.RUSAGE_SELF, before), (resource.RUSAGE_CHILDREN, children))
              for f in ("ru_utime", "ru_stime"))
    assert len(scores) == 200 and 0.3 < sum(scores) / 200 < 1.0
    assert cpu < 5.0 and wall < 30.0, (cpu, wall)


@needs_tex
def test_the_pool_gives_the_same_scores(monkeypatch):
    monkeypatch.setattr(cdm, "CHUNK_ROWS", 10)  # 4 chunks
    refs = ["a+b=c", r"\frac{x}{y}", "x^2+y^2", "a+b"] * 10
    preds = [r.replace("b", "d") + " " * i for i, r in enumerate(refs)]
    assert cdm_scores(preds, refs, processes=2) == cdm_scores(preds, refs, processes=1)



def _chunk_that_kills_its_worker(job):  # run in a spawned worker: it imports this module by name
    os._exit(3)


def _chunk_echo(job):
    return job[1]


def _chunk_fails_or_sleeps(job):
    if job[1][0] == 0:
        raise ValueError("a broken chunk")
    time.sleep(1.0)
    return job[1]


def test_a_failing_chunk_drops_the_chunks_not_started():
    """A chunk's error (or Ctrl-C) ends the call at once and the chunks not started are cancelled: the kept pool
    would otherwise run them all before the next call's chunks (and the interpreter's exit would wait for them)."""
    with pytest.raises(ValueError, match="a broken chunk"):
        cdm._run_chunks(_chunk_fails_or_sleeps, None, list(range(20)), 2, 1)  # 20 chunks of 1 s, 2 workers
    t0 = time.time()
    assert cdm._run_chunks(_chunk_echo, None, [1, 2, 3], 2, 1) == [1, 2, 3]
    assert time.time() - t0 < 6.0  # behind the 19 sleeping chunks: about 10 s


def test_a_dying_worker_is_an_error_not_a_hang():
    """A worker killed mid-chunk (out of memory, a crash in pdfium) ends the call with one error after one retry in
    a fresh pool, instead of waiting forever for the chunk (multiprocessing.Pool's behaviour); the next call gets
    a fresh pool and works."""
    import threading
    done: dict = {}

    def call():
        try:
            done["out"] = cdm._run_chunks(_chunk_that_kills_its_worker, None, [1, 2, 3, 4], 2, 2)
        except Exception as e:
            done["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the call hangs on a dead worker"
    assert isinstance(done.get("error"), UserError), done
    assert str(done["error"]) == ("a worker process of the cdm metric died twice while typesetting and matching "
                                  "formulas (killed for lack of memory, or a crash in pdflatex's PDF reader); "
                                  "free memory and run again")
    assert 2 not in cdm._POOL  # the broken pool is gone, not kept for the next call
    assert cdm._run_chunks(_chunk_echo, None, [1, 2, 3, 4, 5], 2, 2) == [1, 2, 3, 4, 5]

# --- ocrtune eval --------------------------------------------------------------------------------------

@needs_tex
def test_eval_reports_cdm_and_writes_it_per_row(tiny_model_dir, tmp_path, capsys):
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.cli import run_eval
    result = tmp_path / "r.jsonl"
    summary = run_eval(InferArgs(model=str(tiny_model_dir), dataset=["latex-ocr-sample#3"], infer_batch_size=3,
                                 max_new_tokens=8, metrics="cdm,exact_match", result_path=str(result)))
    rows = [json.loads(line) for line in result.read_text().splitlines()]
    assert len(rows) == 3 and all(0.0 <= r["cdm"] <= 1.0 for r in rows)
    assert rows[0]["cdm"] == cdm_scores([rows[0]["prediction"]], [rows[0]["reference"]])[0]
    assert summary["cdm"] == pytest.approx(sum(r["cdm"] for r in rows) / 3, abs=1e-6)
    assert summary["exprate_cdm"] == pytest.approx(sum(r["cdm"] == 1.0 for r in rows) / 3, abs=1e-6)
    assert "exprate_cdm" in capsys.readouterr().out
    assert json.loads((tmp_path / "r_summary.json").read_text())["cdm"] == summary["cdm"]


@needs_tex
def test_eval_cdm_counts_right_and_wrong_rows(tmp_path):
    """With answers known (the reference respelled; a blank one), the summary is exact."""
    from ocrtune.data.loading import load_datasets
    from ocrtune.infer.args import InferArgs
    from ocrtune.infer.dataset import run_dataset
    from ocrtune.models.generate import Answer
    rows = load_datasets(["latex-ocr-sample#4"], "train", True, 42)
    refs = [r["messages"][-1]["content"] for r in rows]

    class Engine:
        template = None

        def iter_answers(self, todo, batch_size, **kw):
            for i in reversed(range(len(todo))):  # out of order, as the real engine answers
                yield i, Answer(" ".join(refs[i].split()) + "  " if i % 2 == 0 else "", 1, "stop")

    args = InferArgs(dataset=["latex-ocr-sample#4"], split="train", metrics="cdm", result_path=str(tmp_path / "r.jsonl"))
    summary = run_dataset(Engine(), {"run_args": {}}, args, ["cdm"])
    assert (summary["cdm"], summary["exprate_cdm"]) == (0.5, 0.5)
    assert [json.loads(line)["cdm"] for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [1.0, 0.0, 1.0, 0.0]
    # rows answered by an earlier run without cdm are scored when a rerun asks for it
    args.result_path = str(tmp_path / "plain.jsonl")
    assert "cdm" not in run_dataset(Engine(), {"run_args": {}}, args, ["exact_match"])
    before = (tmp_path / "plain.jsonl").read_bytes()
    summary = run_dataset(Engine(), {"run_args": {}}, args, ["cdm"])
    assert (summary["cdm"], summary["exprate_cdm"]) == (0.5, 0.5) and (tmp_path / "plain.jsonl").read_bytes() == before


def test_without_pdflatex_eval_fails_before_loading_anything(monkeypatch, tmp_path, capsys):
    from ocrtune.cli.main import main
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("OCRTUNE_TEX_ROOT", raising=False)
    monkeypatch.setattr(cdm, "_TEX", {})
    with pytest.raises(SystemExit) as e:  # the model does not exist: the pdflatex check comes first
        main(["eval", "--model", str(tmp_path / "no-model"), "--dataset", "latex-ocr-sample#2", "--metrics", "bleu,cdm"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: the cdm metric needs LaTeX (pdflatex) and none was found on PATH; ")
    assert "apt-get install texlive-latex-base" in err and "--tex_root" in err
    with pytest.raises(UserError, match="is not an unpacked TeX bundle"):
        cdm_scores(["a"], ["a"], tex_root=str(tmp_path / "nowhere"))


@needs_tex
def test_sft_predict_with_generate_logs_the_metrics_asked_for(tiny_model_dir, tmp_path):
    """sft --predict_with_generate --generate_metrics cdm,exact_match: the evaluation logs eval_cdm and
    eval_exprate_cdm (and exact match), nothing else generated; an unknown name is one error line."""
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import SftRun
    args = SftArgs(model=str(tiny_model_dir), dataset=["latex-ocr-sample#12"], dataset_test_ratio=0.25, max_steps=1,
                   eval_steps=1, predict_with_generate=True, max_new_tokens=6, generate_metrics="cdm,exact_match",
                   output_dir=str(tmp_path), report_to=["none"])
    run = SftRun(args)
    run.train()
    log = [json.loads(line) for line in (run.run_dir / "logging.jsonl").read_text().splitlines()]
    ev = next(r for r in log if "eval_loss" in r)
    assert 0.0 <= ev["eval_cdm"] <= 1.0 and 0.0 <= ev["eval_exprate_cdm"] <= ev["eval_cdm"] + 1e-9
    assert "eval_exact_match" in ev and "eval_bleu4" not in ev
    with pytest.raises(UserError, match="--generate_metrics cdm,nope: unknown metric nope"):
        SftRun(SftArgs(model=str(tiny_model_dir), generate_metrics="cdm,nope", output_dir=str(tmp_path)))
