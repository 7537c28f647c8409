"""CDM (Character Detection Matching; Wang et al., "Image Over Text: Transforming Formula Recognition Evaluation
with Character Detection Matching", CVPR 2025): does the prediction draw the same characters in the same places
as the reference?

Method, per row:

1. **Render** prediction and reference with ocrtune's LaTeX pipeline (`ocrtune.evaluate.typeset`: pdflatex,
   12 pt article, `\\displaystyle`, one tight page per formula, many formulas per run, failures isolated). A
   formula that fails (a TeX error, a missing glyph, a timeout, a forbidden command, unbalanced braces) does not
   compile: as a prediction it scores 0.
2. **Characters and boxes** come straight out of the PDF (pypdfium2's text page: each glyph's unicode and its
   tight box) in drawing order, then every drawn rule (fraction bars, radical and `\\overline` bars) as a
   character `rule`. The reference implementation colours each LaTeX token, renders at 200 dpi and finds
   each colour's box; here the typesetter itself says where each glyph is, so a box is exact and a character
   is a glyph, not a LaTeX token: `\\sin` is three characters (s, i, n), `\\frac` is its bar. Identity is
   the unicode pdfium reads; all sizes of one delimiter or big operator (`(`, `\\big(`, `\\left(` of any
   height; text and display `\\sum`) are one character, as the reference's token normalization makes them
   (its other equivalences, e.g. `\\cdot` = `.`, are not copied: those glyphs differ). The font is not
   compared (`\\mathrm{d}` = `d`, `\\mathbf{A}` = `A`), as the reference's tokens ignore style commands.
3. **Match**, by the reference's rules: boxes are normalized into each formula's own ink box (plus the
   reference's 8 px margin); pairs of the same character are assigned one to one by the Hungarian method on
   cost 0.05 * mean L1 distance of the normalized box coordinates + 0.15 * difference of reading position
   (index / the formula's own count).
   Then the reference's RANSAC: a translation + scale model from 2 random pairs, 50 trials, inliers within
   7.2 pt (its 20 px at 200 dpi) of where the model puts them, the best trial's inliers kept (skimage's `ransac`,
   which the reference calls, refits its model on them but returns the trial's inliers); repeated up to 5 times
   on the pairs left, so a block shifted as a whole (after a missing symbol) still matches while swapped
   symbols do not. That tolerance is the reference's: it is more than a script moves between `x^{a+b}` and
   `x_{a+b}` (6.8 pt), so such pairs score 1. Differences from the reference code: it accepts two pairs or fewer
   unchecked and never matches the last two pairs left over, here any two or more go through RANSAC (`x+y+z`
   against `x+z` finds both blocks; a single pair is accepted only when it is the only one); the assignment
   runs per character, so pairs of different characters (which the reference assigns to fill the matrix
   and drops afterwards) do not vote in RANSAC; the trials are seeded here too (the reference: random_state=42; the draws differ); reading
   order is TeX's drawing order with the rules last, not the LaTeX token order, and each formula's positions are
   divided by its own count (the reference divides both by the longer one's count; with that, a block shifted by
   a missing symbol costs more order, and `x+y+z=1+2+3` against `x+z=1+2+3` here loses one `+`: 16/20, not 18/20).
4. **Score**: F1 = 2 * matched / (characters of prediction + characters of reference). ExpRate@CDM is the
   share of rows with F1 == 1. A blank prediction against a non-blank reference scores 0; two blank
   formulas score 1; a reference that does not compile (the reference skips such rows) scores 1 when the
   prediction is the same text, else 0.

Speed: rows are sorted by reference and typeset in chunks (one pdflatex run each, about 0.1 s of fixed
cost), each distinct formula string once per chunk and each distinct (prediction, reference) scored once.
Inputs of two chunks or more go to a pool of spawned worker processes (`processes`, default: the cores, at
most 16), started on first use and kept for the next call; a worker that dies (killed for memory) costs its
call one retry in a fresh pool, then a one-line error, never a hang. Measured on the sample formulas with a third of
them edited: 1,000 rows (2,000 formulas) cost 2.3-3.3 CPU seconds, about half in Python and half in
pdflatex (about 1.5 s on 2 idle cores); on a 2-core machine at load 6, 2.4 s with the 2 workers warm.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import multiprocessing
import os
import sys
import tempfile
import threading
import types
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ocrtune.errors import UserError
from ocrtune.evaluate.typeset import Tex, find_tex, preflight, typeset_formulas

__all__ = ["cdm_scores", "compiles", "cdm_summary", "check_tex", "Ink", "match_f1"]

NEEDED_BY = "the cdm metric"
TIMEOUT_S = 5.0          # one pdflatex run of a chunk: ~0.2 s normally; a looping formula costs this much
CHUNK_ROWS = 200         # rows (two formulas each) per pdflatex run
POOL_MIN_CHUNKS = 2      # fewer chunks than this: no worker processes
MAX_PROCESSES = 16       # the default pool size at most (each worker holds numpy and pdfium, ~50 MB)
MARGIN_PT = 8 * 72 / 200  # the reference crops each render with 8 px around the ink, at 200 dpi
INLIER_PT = 20 * 72 / 200  # its RANSAC residual threshold, 20 px at 200 dpi
COST_POSITION, COST_ORDER = 0.05, 0.15
RANSAC_ROUNDS, RANSAC_TRIALS, RANSAC_MIN = 5, 50, 2
RULE = "rule"
MAX_ASSIGN = 250_000     # pairs of one character matched exactly (Hungarian); more (a formula of hundreds of the
                         # same glyph): greedily, in reading order, within memory and time linear in the pairs

# cmex10 (TeX's big symbols) by the code pdfium reads for each glyph (no ToUnicode in pdftex's PDF; codes
# 48-67, the extension pieces, come back as Adobe private-use code points): every size of one delimiter
# or operator is that delimiter or operator.
_CMEX_BY_CODE = (
    "()[]⌊⌋⌈⌉{}⟨⟩|∥/\\" "()()[]⌊⌋⌈⌉{}⟨⟩/\\" "()[]⌊⌋⌈⌉{}⟨⟩/\\/\\"
    "()[][][]{}{}{}{|" "()()⟨⟩⨆⨆∮∮⨀⨀⨁⨁⨂⨂" "∑∏∫⋃⋂⨄⋀⋁∑∏∫⋃⋂⨄⋀⋁"
    "∐∐ˆˆˆ˜˜˜[]⌊⌋⌈⌉{}" "√√√√√√√∥↑↓⏞⏞⏟⏟⇑⇓")
_CMEX_PIECES = (0xF8EB, 0xF8F6, 0xF8EE, 0xF8F9, 0xF8F0, 0xF8FB, 0xF8EF, 0xF8FA, 0xF8F1, 0xF8FC, 0xF8F3, 0xF8FE,
                0xF8F2, 0xF8FD, 0xF8F4, 0xF8E6, 0xF8ED, 0xF8F8, 0xF8EC, 0xF8F7)  # codes 48..67
CMEX = {**{c: _CMEX_BY_CODE[c] for c in range(128) if not 48 <= c < 68},
        **{u: _CMEX_BY_CODE[48 + i] for i, u in enumerate(_CMEX_PIECES)}}
# one glyph, two names: what other fonts give for the cmex shapes above
SAME = {"\u2223": "|", "\u2016": "∥", "\u2225": "∥", "\u2329": "⟨", "\u232a": "⟩", "\u2211": "∑", "\u220f": "∏",
        "\u02c6": "ˆ", "\u02dc": "˜"}


@dataclass
class Ink:
    """A rendered formula's characters: `keys[i]` drawn in `boxes[i]` = (x0, y0, x1, y1) in pt, y down,
    relative to the formula's ink box of size `size` (w, h)."""
    keys: list[str]
    boxes: np.ndarray
    size: tuple[float, float]


# ---------------------------------------------------------------------------------------------------- glyphs

def ink_of(page) -> Ink:
    """The glyphs (with their unicode) in drawing order, then the rules, of a pypdfium2 page (pdfium's raw
    calls: its object wrappers cost more than the rest of the metric)."""
    import pypdfium2.raw as raw
    keys: list[str] = []
    boxes: list[tuple] = []
    tp = raw.FPDFText_LoadPage(page.raw)
    try:
        left, right, bottom, top = (ctypes.c_double() for _ in range(4))
        font = ctypes.create_string_buffer(64)
        for i in range(raw.FPDFText_CountChars(tp)):
            if raw.FPDFText_IsGenerated(tp, i):  # pdfium's own spaces and line breaks
                continue
            u = raw.FPDFText_GetUnicode(tp, i)
            key = None
            if u < 0x80 or 0xF8E0 <= u <= 0xF8FF:  # cmex's codes look like ASCII
                raw.FPDFText_GetFontInfo(tp, i, font, len(font), None)
                key = CMEX.get(u) if b"CMEX" in font.value else None
            key = key or chr(u)
            if key.isspace():
                continue
            raw.FPDFText_GetCharBox(tp, i, left, right, bottom, top)
            keys.append(SAME.get(key, key))
            boxes.append((left.value, -top.value, right.value, -bottom.value))
    finally:
        raw.FPDFText_ClosePage(tp)
    l, b, r, t = (ctypes.c_float() for _ in range(4))
    for n in range(raw.FPDFPage_CountObjects(page.raw)):
        obj = raw.FPDFPage_GetObject(page.raw, n)
        if raw.FPDFPageObj_GetType(obj) == raw.FPDF_PAGEOBJ_PATH:
            raw.FPDFPageObj_GetBounds(obj, l, b, r, t)
            keys.append(RULE)
            boxes.append((l.value, -t.value, r.value, -b.value))
    if not keys:
        return Ink([], np.zeros((0, 4)), (0.0, 0.0))
    box = np.array(boxes, dtype=float)
    x0, y0 = box[:, 0].min(), box[:, 1].min()
    box -= (x0, y0, x0, y0)
    return Ink(keys, box, (float(box[:, 2].max()), float(box[:, 3].max())))


# ---------------------------------------------------------------------------------------------------- matching

def _assign(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost one-to-one assignment of the rows of `cost` (n <= m) to columns (Hungarian method)."""
    n, m = cost.shape
    if n == 1:
        return [(0, int(cost[0].argmin()))]
    if n <= 3 and m <= 6:  # few choices: try them all (cheaper than the method's numpy steps)
        rows = cost.tolist()
        best = min(itertools.permutations(range(m), n), key=lambda cols: sum(rows[i][c] for i, c in enumerate(cols)))
        return list(enumerate(best))
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    p = np.zeros(m + 1, dtype=int)       # p[j]: row (1-based) assigned to column j
    way = np.zeros(m + 1, dtype=int)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used[1:]
            cur = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(cand.argmin()) + 1
            delta = cand[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    return [(int(p[j]) - 1, j - 1) for j in range(1, m + 1) if p[j]]


def _candidates(pred: Ink, ref: Ink) -> list[tuple[int, int]]:
    """(pred index, ref index) pairs of the same character, one to one, at least cost per character."""
    def normed(ink):
        w, h = ink.size[0] + 2 * MARGIN_PT, ink.size[1] + 2 * MARGIN_PT
        return (ink.boxes + MARGIN_PT) / (w, h, w, h)
    bp, br = normed(pred), normed(ref)
    op, orf = np.arange(len(pred.keys)) / len(pred.keys), np.arange(len(ref.keys)) / len(ref.keys)
    by_key: dict[str, tuple[list[int], list[int]]] = {}
    for i, k in enumerate(pred.keys):
        by_key.setdefault(k, ([], []))[0].append(i)
    for j, k in enumerate(ref.keys):
        if k in by_key:
            by_key[k][1].append(j)
    pairs = []
    for ps, rs in by_key.values():
        if len(ps) == 1 and len(rs) == 1:  # most characters: nothing to choose
            pairs.append((ps[0], rs[0]))
            continue
        if not rs:
            continue
        pi, ri = np.array(ps), np.array(rs)
        if len(pi) * len(ri) > MAX_ASSIGN:
            pairs += _greedy(pi, ri, bp, br, op, orf)
            continue
        cost = (COST_POSITION * np.abs(bp[pi, None, :] - br[None, ri, :]).sum(-1) / 4
                + COST_ORDER * np.abs(op[pi, None] - orf[None, ri]))
        if len(pi) <= len(ri):
            pairs += [(int(pi[a]), int(ri[b])) for a, b in _assign(cost)]
        else:
            pairs += [(int(pi[a]), int(ri[b])) for b, a in _assign(cost.T)]
    return pairs


def _greedy(pi, ri, bp, br, op, orf) -> list[tuple[int, int]]:
    """One to one pairs of many occurrences of one character: each occurrence of the scarcer side, in reading
    order, takes the cheapest free one of the other (one cost row at a time: no n x m matrix)."""
    swap = len(pi) > len(ri)
    a, b, ba, bb, oa, ob = (ri, pi, br, bp, orf, op) if swap else (pi, ri, bp, br, op, orf)
    boxes, order, free, out = bb[b], ob[b], np.ones(len(b), dtype=bool), []
    for i in a:
        cost = COST_POSITION * np.abs(boxes - ba[i]).sum(-1) / 4 + COST_ORDER * np.abs(order - oa[i])
        j = int(np.where(free, cost, np.inf).argmin())
        free[j] = False
        out.append((int(b[j]), int(i)) if swap else (int(i), int(b[j])))
    return out


def _ransac(src: np.ndarray, dst: np.ndarray, rng) -> np.ndarray:
    """The inliers of the best of RANSAC_TRIALS two-pair models: the most inliers, ties to the smallest sum of
    squared residuals over all pairs, as skimage's `ransac` (the reference's) returns them. Its model is then
    refit on them, but the inliers it returns are the trial's: a refit on all of them (one scale for the lot)
    can put some outside the tolerance again."""
    n = len(src)
    a = rng.integers(0, n, RANSAC_TRIALS)
    b = (a + rng.integers(1, n, RANSAC_TRIALS)) % n  # a second, different pair
    s2, d2 = np.stack([src[a], src[b]], 1), np.stack([dst[a], dst[b]], 1)  # [T, 2, 2]
    shift = d2.mean(1) - s2.mean(1)
    scale = np.linalg.norm(d2[:, 0] - d2[:, 1], axis=1) / (np.linalg.norm(s2[:, 0] - s2[:, 1], axis=1) + 1e-10)
    c = src.mean(0)  # the reference scales about the centroid of all the points it is applied to
    res = np.linalg.norm(scale[:, None, None] * (src - c)[None] + c + shift[:, None] - dst[None], axis=2)  # [T, n]
    ok = res < INLIER_PT
    best = int(np.lexsort(((res ** 2).sum(1), -ok.sum(1)))[0])
    return ok[best]


def match_f1(pred: Ink, ref: Ink, seed: int = 0) -> float:
    """CDM's F1 of two rendered formulas."""
    n_pred, n_ref = len(pred.keys), len(ref.keys)
    if not n_pred or not n_ref:
        return 1.0 if n_pred == n_ref else 0.0
    pairs = _candidates(pred, ref)
    if len(pairs) < RANSAC_MIN:  # one pair: nothing to check its place against
        return 2 * len(pairs) / (n_pred + n_ref)

    def centre(boxes):
        return (boxes[:, :2] + boxes[:, 2:]) / 2
    src = centre(ref.boxes[[j for _, j in pairs]])
    dst = centre(pred.boxes[[i for i, _ in pairs]])
    matched = np.zeros(len(pairs), dtype=bool)
    rng = np.random.default_rng(seed)
    for _ in range(RANSAC_ROUNDS):
        left = np.flatnonzero(~matched)
        if len(left) < RANSAC_MIN:
            break
        found = _ransac(src[left], dst[left], rng)
        if not found.any():
            break
        matched[left[found]] = True
    return 2 * int(matched.sum()) / (n_pred + n_ref)


# ---------------------------------------------------------------------------------------------------- in bulk

def _blank(s) -> bool:
    return s is None or not str(s).strip()


def _typeset_inks(tex: Tex, formulas: list[str], ink: bool = True) -> dict[str, Ink | bool | None]:
    """Each distinct non-blank formula -> its Ink (or True without `ink`), or None when it does not compile."""
    todo = sorted({f for f in formulas if not _blank(f)})
    with tempfile.TemporaryDirectory(prefix="ocrtune-cdm-") as tmp:
        return {f: ((ink_of(page) if ink else True) if page is not None else None)
                for f, (page, _) in zip(todo, typeset_formulas(tex, todo, Path(tmp)))}


def _row_score(pred: str, ref: str, inks: dict[str, Ink | None]) -> float:
    if _blank(ref):
        return 1.0 if _blank(pred) else 0.0
    if _blank(pred):
        return 0.0
    ink_p, ink_r = inks[pred], inks[ref]
    if ink_r is None:  # an unjudgeable row: only the same text is right
        return 1.0 if " ".join(pred.split()) == " ".join(ref.split()) else 0.0
    if ink_p is None:
        return 0.0
    return match_f1(ink_p, ink_r)


def _score_chunk(job: tuple[Tex, list[tuple[str, str]]]) -> list[float]:
    tex, rows = job
    inks = _typeset_inks(tex, [f for row in rows for f in row])
    scores: dict[tuple[str, str], float] = {}  # a row's score depends on its two strings alone
    for row in rows:
        if row not in scores:
            scores[row] = _row_score(*row, inks)
    return [scores[row] for row in rows]


def _compile_chunk(job: tuple[Tex, list[str]]) -> list[bool]:
    tex, formulas = job
    done = _typeset_inks(tex, formulas, ink=False)
    return [not _blank(f) and done[f] is not None for f in formulas]


_TEX: dict[str | None, Tex] = {}
_POOL: dict[int, ProcessPoolExecutor] = {}
_POOL_LOCK = threading.Lock()  # one pool a size, and one __main__ swap at a time


def check_tex(tex_root: str | None = None) -> Tex:
    """The pdflatex the metric runs (checked once a process by typesetting one formula); a one-line
    UserError when there is none or it cannot typeset."""
    key = tex_root or os.environ.get("OCRTUNE_TEX_ROOT") or None
    if key not in _TEX:
        try:
            import pypdfium2  # noqa: F401  (reads the glyphs out of pdflatex's PDF)
        except ImportError:
            raise UserError(f"{NEEDED_BY} needs the pypdfium2 package", "pip install pypdfium2") from None
        tex = find_tex(key, TIMEOUT_S, needed_by=NEEDED_BY)
        preflight(tex)
        _TEX[key] = tex
    return _TEX[key]


@contextlib.contextmanager
def _bare_main():
    """An empty `__main__` while workers are spawned: a spawned worker imports the caller's `__main__` unless told
    otherwise, so a script without an `if __name__ == "__main__":` guard would run again in each of them, and a
    heavy one costs its imports. They need nothing from it (the work is this module's)."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _pool(processes: int) -> ProcessPoolExecutor:
    """A spawned worker pool kept for the next call (a reward function calls this every step). Spawned, never
    forked: the caller may hold a CUDA context (eval on a GPU, GRPO's reward), which a forked child can't use."""
    if processes not in _POOL:
        _POOL[processes] = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
    return _POOL[processes]


def _drop_pool(processes: int) -> None:
    pool = _POOL.pop(processes, None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def _pool_map(fn, chunks: list, processes: int) -> list:
    """`fn` over `chunks` in the kept pool. A worker that dies (killed for memory, a crash in pdfium) breaks the
    pool: its chunks go to a fresh pool once, then a one-line UserError says so (never a hang, as a multiprocessing.Pool
    would wait forever for the dead worker's chunk)."""
    for attempt in (1, 2):
        with _POOL_LOCK:
            pool = _pool(processes)
        futures: list = []
        try:
            with _POOL_LOCK, _bare_main():  # workers start in submit, one as each is needed
                futures = [pool.submit(fn, c) for c in chunks]
            return [f.result() for f in futures]
        except BrokenProcessPool:  # a worker died, in this call or since the last one
            with _POOL_LOCK:
                if _POOL.get(processes) is pool:
                    _drop_pool(processes)
            if attempt == 2:
                raise UserError(f"a worker process of {NEEDED_BY} died twice while typesetting and matching formulas "
                                "(killed for lack of memory, or a crash in pdflatex's PDF reader)",
                                "free memory and run again") from None
        except BaseException:  # a chunk's error, Ctrl-C: the chunks not started are dropped, not left to the
            for f in futures:  # kept pool (the next call would wait behind them; exit waits for them all)
                f.cancel()
            raise
    raise AssertionError("unreachable")


def _run_chunks(fn, tex: Tex, items: list, processes: int | None, size: int) -> list:
    chunks = [(tex, items[s:s + size]) for s in range(0, len(items), size)]
    processes = processes or min(os.cpu_count() or 1, MAX_PROCESSES)
    if processes > 1 and len(chunks) >= POOL_MIN_CHUNKS:  # one pool a size, kept: calls of any length share it
        parts = _pool_map(fn, chunks, processes)
    else:
        parts = [fn(c) for c in chunks]
    return [x for part in parts for x in part]


def cdm_scores(preds: Sequence[str], refs: Sequence[str], tex_root: str | None = None,
               processes: int | None = None) -> list[float]:
    """Per-row CDM F1 in [0, 1] (see the module docstring): 0.0 for a prediction that does not compile or
    is blank against a non-blank reference."""
    preds = ["" if p is None else str(p) for p in preds]
    refs = ["" if r is None else str(r) for r in refs]
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} references")
    if not preds:
        return []
    # rows of one reference go to one chunk (a reward's group of answers, a dataset's repeated formulas)
    order = sorted(range(len(preds)), key=lambda i: (refs[i], preds[i]))
    scores = _run_chunks(_score_chunk, check_tex(tex_root), [(preds[i], refs[i]) for i in order], processes,
                         CHUNK_ROWS)
    out = [0.0] * len(preds)
    for i, score in zip(order, scores):
        out[i] = score
    return out


def compiles(formulas: Sequence[str], tex_root: str | None = None, processes: int | None = None) -> list[bool]:
    """Whether each formula typesets cleanly with ocrtune's LaTeX pipeline (a blank one does not)."""
    formulas = ["" if f is None else str(f) for f in formulas]
    if not formulas:
        return []
    return _run_chunks(_compile_chunk, check_tex(tex_root), formulas, processes, 2 * CHUNK_ROWS)


def cdm_summary(scores: Sequence[float]) -> dict:
    """`cdm` (mean F1) and `exprate_cdm` (share of rows with F1 == 1) of per-row scores."""
    n = len(scores)
    return {"cdm": float(sum(scores) / n) if n else 0.0,
            "exprate_cdm": float(sum(s == 1.0 for s in scores) / n) if n else 0.0}
