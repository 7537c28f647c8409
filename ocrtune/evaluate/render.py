"""Render check: do a prediction and its reference draw the same picture?

Each formula is normalized (:func:`ocrtune.evaluate.latex.normalize_latex`),
lightly rewritten for matplotlib's mathtext (which lacks some LaTeX commands),
rendered as ``$...$`` with mathtext's Agg rasterizer at a fixed DPI and font
size into a grayscale uint8 array (black ink on white, 255 = white), cropped
to the bounding box of non-white pixels and compared pixel for pixel.

Outcomes of :func:`render_match`:

* ``"match"``      both render and the cropped pictures are identical
* ``"differ"``     both render, pictures differ
* ``"ref_fails"``  the reference does not render (takes precedence: the row
                   cannot be judged, whatever the prediction does)
* ``"pred_fails"`` the reference renders, the prediction does not

An empty (or all-whitespace) formula renders as a blank picture; it is not a
failure.  Any exception while parsing/rendering (unknown command, unbalanced
braces, ``\\begin{array}`` which mathtext cannot do, recursion depth) counts as
a failure.  Renders are cached (``functools.lru_cache``), so references seen
repeatedly across evaluations are drawn once.

A real LaTeX install is used only when asked (``engine="latex"``) and
``latex`` and ``dvipng`` are on PATH; mathtext is the default.
"""

from __future__ import annotations

import shutil
import warnings
from functools import lru_cache
from typing import Sequence

import numpy as np

from ocrtune.evaluate.latex import normalize_latex, tokenize_latex

__all__ = [
    "RENDER_DPI",
    "RENDER_FONTSIZE",
    "render_check",
    "render_match",
    "render_formula",
    "to_mathtext",
    "latex_available",
]

RENDER_DPI = 120
RENDER_FONTSIZE = 14
ENGINES = ("mathtext", "latex")

# Commands mathtext does not know that can simply be dropped (style/size
# switches, spacing hints, big-delimiter sizers: the delimiter itself stays).
_DROP = frozenset(
    r"""
    \displaystyle \textstyle \scriptstyle \scriptscriptstyle \limits \nolimits
    \big \Big \bigg \Bigg \bigl \Bigl \biggl \Biggl \bigr \Bigr \biggr \Biggr
    \bigm \Bigm \biggm \Biggm
    \boldmath \unboldmath \tiny \scriptsize \footnotesize \small \normalsize
    \large \Large \LARGE \huge \Huge \nonumber \notag \relax \strut \protect
    \noindent \smash \mathop \mathbin \mathrel \mathord \mathopen \mathclose
    \mathpunct \mathinner \ensuremath \hfill \hfil
    """.split()
)
# Commands dropped together with their following {...} argument.
_DROP_WITH_ARG = frozenset(r"\hspace \vspace \vphantom \hphantom \label \tag".split())
# One-token replacements.
_MAP = {
    r"\lbrace": r"\{",
    r"\rbrace": r"\}",
    r"\lbrack": "[",
    r"\rbrack": "]",
    r"\lvert": "|",
    r"\rvert": "|",
    r"\lVert": r"\|",
    r"\rVert": r"\|",
    r"\le": r"\leq",
    r"\ge": r"\geq",
    r"\lt": "<",
    r"\gt": ">",
    r"\land": r"\wedge",
    r"\lor": r"\vee",
    r"\lnot": r"\neg",
    r"\gets": r"\leftarrow",
    r"\owns": r"\ni",
    r"\iff": r"\Leftrightarrow",
    r"\implies": r"\Rightarrow",
    r"\hdots": r"\ldots",
    r"\textrm": r"\mathrm",
    r"\textnormal": r"\mathrm",
    r"\textup": r"\mathrm",
    r"\mbox": r"\mathrm",
    r"\hbox": r"\mathrm",
    r"\textbf": r"\mathbf",
    r"\textit": r"\mathit",
    r"\emph": r"\mathit",
    r"\textsf": r"\mathsf",
    r"\texttt": r"\mathtt",
    r"\tfrac": r"\frac",
    r"\cfrac": r"\frac",
    r"\stackrel": r"\overset",
    r"\medspace": r"\:",
    r"\negthinspace": r"\!",
}
# Commands whose arguments must be braced for mathtext (number of arguments).
_NARGS = {
    **dict.fromkeys(
        r"\frac \dfrac \binom \dbinom \tbinom \overset \underset".split(), 2
    ),
    **dict.fromkeys(
        r"""\sqrt \hat \bar \vec \tilde \dot \ddot \dddot \ddddot \check \breve
        \acute \grave \mathring \widehat \widetilde \widebar \overline \underline
        \overrightarrow \overleftarrow \mathrm \mathbf \mathit \mathsf \mathtt
        \mathcal \mathbb \mathfrak \mathscr \mathdefault \mathnormal \boldsymbol
        \operatorname \text""".split(),
        1,
    ),
}
# Tokens that cannot start an argument (leave the formula broken as it is).
_NOT_AN_ARG = frozenset(["}", "&", "^", "_", "]", "\\\\"])


def _is_control_word(tok: str) -> bool:
    return len(tok) > 1 and tok[0] == "\\" and tok[1:].isalpha()


def _skip_group(tokens: list[str], i: int, allow_star: bool = True) -> int:
    """Index just past a ``{...}`` group starting at ``tokens[i]`` (if any;
    with ``allow_star`` a leading ``*`` as in ``\\hspace*`` is skipped too)."""
    if allow_star and i < len(tokens) and tokens[i] == "*":
        i += 1
    if i >= len(tokens) or tokens[i] != "{":
        return i
    depth = 0
    while i < len(tokens):
        if tokens[i] == "{":
            depth += 1
        elif tokens[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def _rewrite_tokens(tokens: list[str]) -> list[str]:
    """Drop / replace the commands mathtext lacks (see _DROP, _MAP)."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        if tok == "$":
            raise ValueError("bare '$' inside a formula")
        if tok in _DROP:
            continue
        if tok in _DROP_WITH_ARG:
            i = _skip_group(tokens, i)
            continue
        if tok == r"\operatorname" and i < len(tokens) and tokens[i] == "*":
            i += 1
        for prefix in (r"\left", r"\right"):
            # glued delimiter tokens: \left\lbrace -> \left\{ etc.
            if tok.startswith(prefix) and tok[len(prefix):] in _MAP:
                tok = prefix + _MAP[tok[len(prefix):]]
        out.append(_MAP.get(tok, tok))
    return out


def _brace_args(tokens: list[str]) -> list[str]:
    """Wrap single-token arguments in braces: mathtext needs ``\\frac{1}{2}``
    where LaTeX also takes ``\\frac 1 2`` / ``\\sqrt x`` / ``\\mathrm d``."""
    opens = [0] * (len(tokens) + 1)
    closes = [0] * (len(tokens) + 1)
    for i, tok in enumerate(tokens):
        nargs = _NARGS.get(tok)
        if not nargs:
            continue
        j = i + 1
        if tok == r"\sqrt" and j < len(tokens) and tokens[j] == "[":
            depth = 0
            while j < len(tokens):
                depth += tokens[j] == "["
                depth -= tokens[j] == "]"
                j += 1
                if depth == 0:
                    break
        for _ in range(nargs):
            if j >= len(tokens) or tokens[j] in _NOT_AN_ARG:
                break
            if tokens[j] == "{":
                j = _skip_group(tokens, j, allow_star=False)
            else:
                opens[j] += 1
                closes[j] += 1
                j += 1
    out: list[str] = []
    for j, tok in enumerate(tokens):
        out.extend("{" * opens[j])
        out.append(tok)
        out.extend("}" * closes[j])
    return out


def to_mathtext(latex: str) -> str:
    """Rewrite (normalized) LaTeX into a compact string mathtext can parse.

    Unsupported commands are dropped or mapped (``\\displaystyle`` dropped,
    ``\\lbrace`` -> ``\\{``, ``\\le`` -> ``\\leq``, ``\\textrm`` -> ``\\mathrm``,
    ...), single-token arguments get braces (``\\frac 1 2`` -> ``\\frac{1}{2}``),
    and tokens are joined without spaces (mathtext treats ``x ^ 2`` differently
    from ``x^2``), keeping one space only where a control word is followed by
    a letter (``\\alpha b``).  A lone ``\\`` token (control space) becomes ``\\ ``.
    Raises ValueError for a bare ``$`` (it would end math mode).
    """
    tokens = _brace_args(_rewrite_tokens(tokenize_latex(latex)))
    out: list[str] = []
    for tok in tokens:
        if tok == "\\":
            tok = "\\ "
        if out and _is_control_word(out[-1]) and tok[0].isalpha():
            out.append(" ")
        out.append(tok)
    return "".join(out)


# ---------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _mathtext_parser():
    from matplotlib.font_manager import FontProperties
    from matplotlib.mathtext import MathTextParser

    return MathTextParser("agg"), FontProperties(size=RENDER_FONTSIZE)


def latex_available() -> bool:
    return bool(shutil.which("latex") and shutil.which("dvipng"))


def _crop(gray: np.ndarray) -> np.ndarray:
    """Crop a white-background grayscale image to its non-white bounding box."""
    ys, xs = np.nonzero(gray < 255)
    if len(ys) == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    return gray[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def _render_mathtext(src: str) -> np.ndarray:
    parser, prop = _mathtext_parser()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ink = np.asarray(parser.parse(f"${src}$", dpi=RENDER_DPI, prop=prop, antialiased=True).image)
    return 255 - ink.astype(np.uint8)


def _render_latex(src: str) -> np.ndarray:
    from matplotlib.texmanager import TexManager

    alpha = np.asarray(TexManager().get_grey(f"${src}$", fontsize=RENDER_FONTSIZE, dpi=RENDER_DPI))
    return (255 - np.round(alpha * 255)).astype(np.uint8)


@lru_cache(maxsize=2048)  # a picture is ~50-100 KB: 2,048 of them stay near 100-200 MB in a long run
def _render_cached(normalized: str, engine: str):
    """Cropped grayscale picture (read-only array) or None if rendering fails."""
    if not normalized:
        return np.zeros((0, 0), dtype=np.uint8)
    try:
        if engine == "latex":
            img = _render_latex(normalized)
        else:
            img = _render_mathtext(to_mathtext(normalized))
        img = np.ascontiguousarray(_crop(img))
    except Exception:  # unknown command, syntax error, RecursionError, ...
        return None
    img.setflags(write=False)
    return img


def _check_engine(engine: str) -> str:
    if engine not in ENGINES:
        raise ValueError(f"unknown render engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "latex" and not latex_available():
        raise RuntimeError("engine='latex' needs `latex` and `dvipng` on PATH; use engine='mathtext'")
    return engine


def render_formula(latex: str, engine: str = "mathtext"):
    """Cropped grayscale uint8 picture of ``latex`` (255 = white), or None if
    it cannot be rendered.  The returned array is cached and read-only."""
    return _render_cached(normalize_latex(latex or ""), _check_engine(engine))


def _status(pred_img, ref_img) -> str:
    if ref_img is None:
        return "ref_fails"
    if pred_img is None:
        return "pred_fails"
    if pred_img.shape == ref_img.shape and np.array_equal(pred_img, ref_img):
        return "match"
    return "differ"


def render_match(pred: str, ref: str, engine: str = "mathtext") -> str:
    """One of ``"match"``, ``"differ"``, ``"pred_fails"``, ``"ref_fails"``."""
    return _status(render_formula(pred, engine), render_formula(ref, engine))


def render_check(preds: Sequence[str], refs: Sequence[str], engine: str = "mathtext") -> dict:
    """Summary over rows: ``render_match`` (share of all rows whose pictures
    match), ``render_fail_pred`` (share of predictions that fail to render),
    ``render_fail_ref`` (share of references that fail).  0.0 for no rows."""
    preds, refs = list(preds), list(refs)
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} references")
    n = len(preds)
    if n == 0:
        return {"render_match": 0.0, "render_fail_pred": 0.0, "render_fail_ref": 0.0}
    match = fail_pred = fail_ref = 0
    for p, r in zip(preds, refs):
        p_img, r_img = render_formula(p, engine), render_formula(r, engine)
        fail_pred += p_img is None
        fail_ref += r_img is None
        match += _status(p_img, r_img) == "match"
    return {
        "render_match": match / n,
        "render_fail_pred": fail_pred / n,
        "render_fail_ref": fail_ref / n,
    }
