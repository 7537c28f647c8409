"""`ocrtune synth`: print-style rows from real LaTeX (style against real rows, bad and looping formulas,
determinism, exclusion, mutation, resume, a missing LaTeX) and the folder it writes trains."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ocrtune.data.registry import SAMPLE_DIR
from ocrtune.errors import UserError
from ocrtune.synth.mutate import CLASS_OF, CLASSES, mutate, normalize, recombine_tokens, scramble_tokens, top_level_cuts
from ocrtune.evaluate.typeset import find_tex, precheck
from ocrtune.synth.render import render_formulas
from ocrtune.synth.run import SynthArgs, plan_formulas, run_synth
from ocrtune.synth.style import BUCKETS, PAD, ink_box, pick_bucket

ROOT = Path(__file__).resolve().parents[1]
needs_tex = pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (apt-get install texlive-latex-base)")
GOOD = [r"\frac { a + b } { c }", r"x ^ { 2 } + y ^ { 2 } = z ^ { 2 }", r"\sum _ { i = 1 } ^ { n } i = \frac { n ( n + 1 ) } { 2 }",
        r"\alpha \beta \gamma", r"\int _ { 0 } ^ { 1 } f ( x ) d x"]
LOOP = r"\count255=1 \loop \ifnum \count255>0 \repeat"


def sample_texts(n=None):
    texts = pq.read_table(SAMPLE_DIR / "train.parquet", columns=["text"]).column("text").to_pylist()
    return texts[:n] if n else texts


def decode(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png))


def shard_rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("train-*.parquet")) for r in pq.read_table(p).to_pylist()]


def synth(tmp_path, name="out", **kw) -> tuple[dict, Path]:
    out = tmp_path / name
    kw.setdefault("num_proc", 1)
    return run_synth(SynthArgs(output_dir=str(out), **kw)), out


# --- style: against the real print rows -------------------------------------------------------------

def test_buckets_are_the_real_print_sizes(shared_data):
    """Every real print row has one of the 17 sizes, and (for 96% of 3,000 rows measured) it is the first
    bucket holding its ink plus 4 px; the rest differ by the antialiased fringe at the crop threshold."""
    table = pq.read_table(shared_data / "print" / "train.parquet").slice(0, 1000)
    hits, sizes = 0, set()
    for ref in table.column("image").to_pylist():
        gray = np.asarray(decode(ref["bytes"]))
        assert decode(ref["bytes"]).mode == "L"
        sizes.add((gray.shape[1], gray.shape[0]))
        top, bottom, left, right = ink_box(gray)
        hits += pick_bucket(right + PAD, bottom + PAD) == (gray.shape[1], gray.shape[0])
    assert sizes <= set(BUCKETS)
    assert hits / len(table) >= 0.9


def test_pick_bucket_takes_the_first_that_fits():
    assert pick_bucket(100, 45) == (120, 50)   # first in the list
    assert pick_bucket(130, 40) == (160, 40)   # too wide for 120x50
    assert pick_bucket(390, 150) == (400, 160)
    assert pick_bucket(501, 10) is None


@needs_tex
def test_synthetic_rows_match_real_rows_of_the_same_formulas(shared_data):
    """Same formulas, real vs synthetic. Measured on 500 print rows at 87 dpi: 80% land in the same bucket;
    ink ratio median 1.04 (10th-90th percentile 1.00-1.09); ink-box width ratio median 0.995, height 1.03.
    Bounds: the measured medians +- the 10-90 spread of the ink ratio (0.09)."""
    table = pq.read_table(shared_data / "print" / "train.parquet").slice(0, 200)
    texts = table.column("text").to_pylist()
    results = render_formulas(find_tex(), texts)
    same, ink, widths, heights = [], [], [], []
    for ref, (png, why) in zip(table.column("image").to_pylist(), results):
        if png is None:
            continue
        real, syn = decode(ref["bytes"]), decode(png)
        assert syn.mode == "L" and syn.size in BUCKETS
        r, s = np.asarray(real, dtype=float), np.asarray(syn, dtype=float)
        same.append(real.size == syn.size)
        ink.append((255 - s).sum() / (255 - r).sum())
        (rt, rb, rl, rr), (st, sb, sl, sr) = ink_box(r), ink_box(s)
        assert (st, sl) == (PAD, PAD) or min(st, sl) >= PAD - 1  # pasted top-left with 4 px of padding
        widths.append((sr - sl) / (rr - rl))
        heights.append((sb - st) / (rb - rt))
    assert len(same) >= 195
    assert np.mean(same) >= 0.7
    assert abs(np.median(ink) - 1.04) < 0.09
    assert abs(np.median(widths) - 1.0) < 0.09 and abs(np.median(heights) - 1.03) < 0.09


# --- robustness --------------------------------------------------------------------------------------

@needs_tex
def test_a_formula_that_breaks_tex_is_skipped_and_its_neighbours_are_unchanged():
    tex = find_tex()
    alone = render_formulas(tex, GOOD)
    broken = [r"x \undefinedmacro y", r"a \begin{array} b", r"\left( x"]
    mixed = [GOOD[0], broken[0], GOOD[1], broken[1], GOOD[2], broken[2], GOOD[3], GOOD[4]]
    got = render_formulas(tex, mixed)
    assert [why.split(":")[0] for _, why in got[1:6:2]] == ["tex error"] * 3 and all(p is None for p, _ in got[1:6:2])
    assert [p for p, _ in (got[0], got[2], got[4], got[6], got[7])] == [p for p, _ in alone]  # byte for byte


@needs_tex
def test_a_formula_that_loops_forever_times_out_and_is_skipped():
    tex = find_tex(timeout=2)
    got = render_formulas(tex, [GOOD[0], LOOP, GOOD[1]])
    assert got[1] == (None, "timeout")
    assert got[0][0] is not None and got[2][0] is not None


@needs_tex
def test_a_huge_page_is_skipped_before_it_is_rasterized(monkeypatch):
    """A 300 cm rule would be a 20,000-pixel bitmap at 174 dpi: skipped from its page size alone."""
    import ocrtune.synth.render as render
    import ocrtune.synth.style as style
    styled = []
    monkeypatch.setattr(style, "style_row", lambda gray: styled.append(gray.shape) or (None, "blank"))
    got = render_formulas(find_tex(), [GOOD[0], r"x \rule { 300cm } { 1pt }", r"x \rule { 1pt } { 300cm }", GOOD[1]])
    assert [why for _, why in got] == ["blank", "too large", "too large", "blank"]
    assert len(styled) == 2 and max(max(s) for s in styled) < 400  # only the two small pages were rasterized
    assert render.fits_a_bucket(500 * 72 / 87 + 8, 10) and not render.fits_a_bucket(500 * 72 / 87 + 12, 10)


def test_precheck_refuses_what_would_escape_the_page():
    assert precheck(r"\input{/etc/passwd}").startswith("forbidden")
    assert precheck(r"\immediate\write18{ls}").startswith("forbidden")
    assert precheck(r"\gdef\x{1}") .startswith("forbidden")
    assert precheck("{ a") == "unbalanced braces" and precheck("a } {") == "unbalanced braces"
    assert precheck(r"\{ a") == "" and precheck(r"\overline { x }") == ""
    assert precheck("a $ b $ c") == "math shift $" and precheck(r"\$ 5") == ""


# --- mutation and exclusion --------------------------------------------------------------------------

def test_mutate_makes_n_new_distinct_space_tokenized_formulas():
    inputs = sample_texts()
    excluded = {normalize(t) for t in sample_texts(50)[::2]} | {normalize(GOOD[0])}
    made = mutate(inputs, 500, seed=3, exclude=excluded)
    assert len(made) == len(set(made)) == 500
    assert not set(made) & ({normalize(t) for t in inputs} | excluded)
    assert all(m == normalize(m) for m in made)
    assert mutate(inputs, 500, seed=3, exclude=excluded) == made and mutate(inputs, 500, seed=4, exclude=excluded) != made
    classed = sum(t in CLASS_OF for m in made for t in m.split())
    assert classed > 0


def test_scramble_redraws_symbols_and_keeps_the_layout():
    import random
    tokens = " ".join(sample_texts()).split()
    classed = [i for i, t in enumerate(tokens) if t in CLASS_OF]
    assert scramble_tokens(tokens, random.Random(0), 0.0) == tokens
    out = scramble_tokens(tokens, random.Random(0), 1.0)
    assert len(out) == len(tokens) and len(classed) > 1000
    assert all(o == t for o, t in zip(out, tokens) if t not in CLASS_OF)           # layout tokens untouched
    assert all(CLASS_OF[o] == CLASS_OF[t] for o, t in zip(out, tokens) if t in CLASS_OF)  # same class
    # redrawn uniformly from the class: a token stays what it was with chance 1/|class| (<= 1/10, digits)
    kept = sum(out[i] == tokens[i] for i in classed) / len(classed)
    expected = sum(1 / len(CLASSES[CLASS_OF[tokens[i]]]) for i in classed) / len(classed)
    assert abs(kept - expected) < 4 * (expected / len(classed)) ** 0.5 + 0.01, (kept, expected)
    half = scramble_tokens(tokens, random.Random(1), 0.5)
    changed = sum(half[i] != tokens[i] for i in classed) / len(classed)
    assert 0.5 * (1 - 0.2) < changed < 0.5  # about half redrawn, a few of those drawing the same token again


def test_mutate_with_scramble_is_deterministic_new_and_unchanged_at_zero():
    inputs = sample_texts()
    excluded = {normalize(t) for t in sample_texts(50)[::2]}
    plain = mutate(inputs, 300, seed=3, exclude=excluded)
    assert mutate(inputs, 300, seed=3, exclude=excluded, scramble=0.0) == plain  # no draws at 0: same formulas
    made = mutate(inputs, 300, seed=3, exclude=excluded, scramble=1.0)
    assert made == mutate(inputs, 300, seed=3, exclude=excluded, scramble=1.0) and made != plain
    assert len(set(made)) == 300 and not set(made) & ({normalize(t) for t in inputs} | excluded)
    # scrambled formulas share far fewer symbols with the inputs' formulas: per output, the share of its classed
    # tokens found at the same position of the input formula that has the most of them in common
    def overlap(formulas):
        srcs = [normalize(t).split() for t in inputs]
        shares = []
        for f in formulas[:100]:
            toks = f.split()
            idx = [i for i, t in enumerate(toks) if t in CLASS_OF]
            if idx:
                shares.append(max(sum(i < len(s) and s[i] == toks[i] for i in idx) for s in srcs) / len(idx))
        return sum(shares) / len(shares)
    assert overlap(made) < overlap(plain) - 0.3, (overlap(made), overlap(plain))


def test_recombine_joins_a_head_and_a_tail_at_top_level_cuts():
    import random
    a = "\\frac { a = b } { c } = \\left ( x , y \\right ) + z".split()
    assert top_level_cuts(a) == [9]  # not the = inside {...} nor the , inside \\left ... \\right
    b = "p \\leq \\begin { array } { c } q = r \\end { array } , s".split()
    assert top_level_cuts(b) == [1, 16]  # not the = inside \\begin ... \\end
    rng = random.Random(0)
    outs = {" ".join(recombine_tokens(a, b, rng)) for _ in range(40)}
    assert outs == {"\\frac { a = b } { c } \\leq \\begin { array } { c } q = r \\end { array } , s",
                    "\\frac { a = b } { c } , s"}
    assert recombine_tokens("x + 1".split(), b, rng) == "x + 1".split()  # no cut: unchanged


def test_mutate_with_recombine_makes_new_structures_and_is_unchanged_at_zero():
    inputs = sample_texts()
    plain = mutate(inputs, 300, seed=3)
    assert mutate(inputs, 300, seed=3, recombine=0.0) == plain  # no draws at 0: the same formulas
    made = mutate(inputs, 300, seed=3, recombine=1.0)
    assert made == mutate(inputs, 300, seed=3, recombine=1.0) and len(set(made)) == 300
    # structure: a formula with its classed symbols replaced by their class names; a recombined set holds more
    # structures that no input has (mutations keep most of an input's)
    def skeleton(f):
        return " ".join(CLASS_OF.get(t, t) for t in f.split())
    known = {skeleton(normalize(t)) for t in inputs}
    def new_share(formulas):
        return sum(skeleton(f) not in known for f in formulas) / len(formulas)
    # a swap keeps the skeleton and a splice replaces one group: about half the plain ones are new; recombined
    # ones join two inputs' halves
    assert new_share(made) > new_share(plain) + 0.2, (new_share(made), new_share(plain))
    heads = {" ".join(normalize(t).split()[:3]) for t in inputs}
    assert sum(" ".join(f.split()[:3]) in heads for f in made) > 0.5 * len(made)  # they still start as inputs do


@needs_tex
def test_recombined_formulas_typeset(tmp_path):
    result, out = synth(tmp_path, dataset=["latex-ocr-sample#60"], mutate=60, recombine=1.0, seed=1, num_proc=2)
    assert len(shard_rows(out)) == result["rendered"] >= 54, result  # as many typeset as plain mutations (~98%)
    with pytest.raises(UserError, match="--recombine"):
        synth(tmp_path, "bad", dataset=["latex-ocr-sample#5"], mutate=0, recombine=0.5)
    with pytest.raises(UserError, match="--recombine 2"):
        synth(tmp_path, "bad2", dataset=["latex-ocr-sample#5"], mutate=5, recombine=2.0)


@needs_tex
def test_scrambled_formulas_typeset(tmp_path):
    result, out = synth(tmp_path, dataset=["latex-ocr-sample#60"], mutate=60, scramble=1.0, seed=1, num_proc=2)
    rows = shard_rows(out)
    assert len(rows) == result["rendered"] >= 54, result  # as many typeset as plain mutations (~98%)
    with pytest.raises(UserError, match="--scramble"):
        synth(tmp_path, "bad", dataset=["latex-ocr-sample#5"], mutate=0, scramble=0.5)
    with pytest.raises(UserError, match="--scramble 1.5"):
        synth(tmp_path, "bad2", dataset=["latex-ocr-sample#5"], mutate=5, scramble=1.5)


@needs_tex
def test_exclude_drops_inputs_and_mutations(tmp_path):
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(GOOD) + "\n")
    banned = tmp_path / "banned.jsonl"
    banned.write_text('{"text": "%s"}\n' % "  x ^ { 2 }   +  y ^ { 2 } = z ^ { 2 } ".replace("\\", "\\\\"))
    result, out = synth(tmp_path, dataset=[str(inputs)], exclude=[str(banned)], mutate=40, include_input=True)
    texts = [normalize(r["text"]) for r in shard_rows(out)]
    assert normalize(GOOD[1]) not in texts and result["skipped"]["excluded"] == 1
    assert len(texts) + sum(result["skipped"].values()) == len(GOOD) + 40
    assert set(normalize(g) for g in GOOD) - {normalize(GOOD[1])} <= set(texts)
    with pytest.raises(UserError, match=r"no formulas left to render .*\(5 excluded\)"):
        synth(tmp_path, "none", dataset=[str(inputs)], exclude=[str(inputs)])


# --- the command: determinism, resume, errors, training on the output ---------------------------------

@needs_tex
def test_same_seed_same_bytes_for_any_num_proc_and_resume(tmp_path):
    kw = dict(dataset=["latex-ocr-sample#40"], mutate=35, include_input=True, seed=5, shard_size=30, chunk_size=10)
    r1, a = synth(tmp_path, "a", **kw)
    r2, b = synth(tmp_path, "b", **{**kw, "num_proc": 2})
    shards = sorted(p.name for p in a.glob("*.parquet"))
    assert shards == ["train-00000.parquet", "train-00001.parquet", "train-00002.parquet"]
    assert all((a / s).read_bytes() == (b / s).read_bytes() for s in shards)
    assert r1["rendered"] > 60 and r1["rendered"] == len(shard_rows(a))
    _, c = synth(tmp_path, "c", **{**kw, "seed": 6})
    assert [r["text"] for r in shard_rows(c)] != [r["text"] for r in shard_rows(a)]
    # a killed run: one shard missing -> the rerun writes it (same bytes) and leaves the others alone
    kept = (a / shards[0]).stat().st_mtime_ns
    missing = (a / shards[1]).read_bytes()
    (a / shards[1]).unlink()
    synth(tmp_path, "a", **kw)
    assert (a / shards[1]).read_bytes() == missing and (a / shards[0]).stat().st_mtime_ns == kept
    with pytest.raises(Exception, match="other flags"):
        synth(tmp_path, "a", **{**kw, "seed": 7})


def ocrtune(*args, env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "ocrtune", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_missing_latex_is_a_one_line_error_naming_the_packages(tmp_path):
    out = ocrtune("synth", "--dataset", "latex-ocr-sample", "--output_dir", str(tmp_path / "o"),
                  env={"PATH": str(tmp_path / "empty"), "OCRTUNE_TEX_ROOT": ""})
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: ") and "apt-get install texlive-latex-base" in out.stderr
    out = ocrtune("synth", "--dataset", "latex-ocr-sample", "--output_dir", str(tmp_path / "o"),
                  "--tex_root", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "is not an unpacked TeX bundle" in out.stderr and out.stderr.count("\n") == 1
    broken = tmp_path / "broken"  # a bundle whose pdftex can't typeset: one error, not one per formula
    (broken / "bin").mkdir(parents=True)
    (broken / "texmf" / "web2c").mkdir(parents=True)
    (broken / "texmf" / "web2c" / "pdflatex.fmt").write_bytes(b"")
    (broken / "bin" / "pdftex").write_text("#!/bin/sh\necho '! LaTeX Error: File bm.sty not found.'\nexit 1\n")
    (broken / "bin" / "pdftex").chmod(0o755)
    out = ocrtune("synth", "--dataset", "latex-ocr-sample", "--output_dir", str(tmp_path / "o"), "--tex_root", str(broken))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "cannot typeset a plain formula: ! LaTeX Error: File bm.sty not found." in out.stderr
    assert not (tmp_path / "o").exists()


@needs_tex
def test_the_output_folder_trains(tmp_path, tiny_model_dir):
    from ocrtune.train.args import SftArgs
    from ocrtune.train.trainer import run_sft
    out = ocrtune("synth", "--dataset", "latex-ocr-sample#24", "--output_dir", str(tmp_path / "rows"), "--num_proc", "1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("synth: ") and " rendered, " in out.stdout
    result = run_sft(SftArgs(model="tiny", dataset=[str(tmp_path / "rows")], max_steps=2, output_dir=str(tmp_path / "run")))
    assert (Path(result["last_model_checkpoint"]) / "adapter_model.safetensors").exists()
    assert result["last_model_checkpoint"].endswith("checkpoint-2")


def test_max_rows_and_include_input_pick_the_formulas(tmp_path):
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(GOOD) + "\n")
    formulas, _ = plan_formulas(SynthArgs(dataset=[str(inputs)], mutate=10, max_rows=7))
    assert len(formulas) == 7 and not set(formulas) & set(GOOD)          # with --mutate: mutations only
    formulas, _ = plan_formulas(SynthArgs(dataset=[str(inputs)], mutate=10, include_input=True, max_rows=7))
    assert formulas[:5] == GOOD and len(formulas) == 7                     # inputs first, then mutations
    assert plan_formulas(SynthArgs(dataset=[str(inputs)]))[0] == GOOD      # no --mutate: the inputs


@needs_tex
@pytest.mark.skipif(shutil.which("xz") is None, reason="xz is not installed")
def test_the_portable_tex_bundle_works_alone_and_renders_like_system_tex(tmp_path):
    formulas = tmp_path / "formulas.txt"
    formulas.write_text("\n".join(GOOD + sample_texts(60)) + "\n")
    env = {**os.environ, "XZ_OPT": "-0", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "make_tex_bundle.sh"), str(tmp_path / "b.tar.xz"), str(formulas)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "every file it opened was its own" in out.stdout
    with tarfile.open(tmp_path / "b.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    bundled = render_formulas(find_tex(str(tmp_path)), GOOD)  # the folder it was unpacked into will do
    assert all(png is not None for png, _ in bundled) and bundled == render_formulas(find_tex(), GOOD)
