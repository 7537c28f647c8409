"""OCR metrics for LaTeX formula recognition.

The LaTeX_OCR references are space-tokenized LaTeX, e.g.
``d s ^ { 2 } = ( 1 - \\frac { q } { r } )``.  Model predictions may or may not
follow that spacing, so every metric first passes both sides through
:func:`normalize_latex`, which re-tokenizes LaTeX the way the data is tokenized.

Pure Python: importing this module does not import torch or matplotlib.
``token_accuracy`` imports torch lazily; the ``render`` metric imports
:mod:`ocrtune.evaluate.render` (matplotlib) lazily, the ``cdm`` metric
:mod:`ocrtune.evaluate.cdm` (pdflatex, pypdfium2).

Conventions
-----------
* BLEU: sacrebleu with ``tokenize="none"`` on normalized strings (so n-grams
  are LaTeX tokens), reported on a 0..1 scale.  :func:`bleu4` is corpus BLEU
  with sacrebleu's ``corpus_bleu`` defaults (``smooth_method="exp"``, i.e.
  n-gram orders with zero matches get precision ``1 / (2**k * total)``; this
  only matters for tiny corpora).  :func:`sentence_bleu4` is sacrebleu's
  ``sentence_bleu`` defaults (``smooth_method="exp"``, ``effective_order=True``);
  two empty strings score 1.0 (sacrebleu would say 0).
* Edit distance: Levenshtein distance / max(len(pred), len(ref)), 0.0 when
  both are empty.  ``level="token"`` counts LaTeX tokens (``\\frac`` is one
  edit); ``level="char"`` counts characters of the normalized string with all
  spaces removed, so token spacing is never counted as an error.
* Exact match: equality of the normalized strings.
* CDM: :mod:`ocrtune.evaluate.cdm` (rendered characters matched by place).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterable, Sequence

from ocrtune.evaluate.latex import normalize_latex

__all__ = [
    "METRIC_NAMES",
    "bleu4",
    "sentence_bleu4",
    "edit_distance",
    "exact_match",
    "argmax_hits",
    "token_accuracy",
    "per_row_metrics",
    "compute_metrics",
]

METRIC_NAMES = ("bleu", "edit_distance", "exact_match", "render", "cdm")

# ---------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------
#
# Token rules: ocrtune/evaluate/latex.py (shared with the render metric).


@lru_cache(maxsize=65536)
def _norm_cached(s: str) -> str:
    return normalize_latex(s)


# ---------------------------------------------------------------------------
# BLEU
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _sentence_bleu_scorer():
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize="none", smooth_method="exp", effective_order=True)


def bleu4(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU-4 in [0, 1] (sacrebleu ``corpus_bleu`` defaults, tokenize="none")."""
    import sacrebleu

    preds, refs = list(preds), list(refs)
    _check_lengths(preds, refs)
    if not preds:
        return 0.0
    hyps = [_norm_cached(p or "") for p in preds]
    refs_n = [_norm_cached(r or "") for r in refs]
    score = sacrebleu.corpus_bleu(hyps, [refs_n], tokenize="none").score
    return float(score) / 100.0


def sentence_bleu4(pred: str, ref: str) -> float:
    """Sentence BLEU-4 in [0, 1] (sacrebleu ``sentence_bleu``: exp smoothing,
    effective order).  Two empty strings score 1.0."""
    hyp, r = _norm_cached(pred or ""), _norm_cached(ref or "")
    if not hyp and not r:
        return 1.0
    return float(_sentence_bleu_scorer().sentence_score(hyp, [r]).score) / 100.0


# ---------------------------------------------------------------------------
# Edit distance / exact match
# ---------------------------------------------------------------------------


def edit_distance(pred: str, ref: str, level: str = "token") -> float:
    """Normalized Levenshtein distance in [0, 1].

    ``level="token"``: over LaTeX token lists; ``level="char"``: over the
    normalized strings with spaces removed.  distance / max(len(pred), len(ref)),
    0.0 if both are empty.
    """
    from rapidfuzz.distance import Levenshtein

    p, r = _norm_cached(pred or ""), _norm_cached(ref or "")
    if level == "token":
        a, b = p.split(), r.split()
    elif level == "char":
        a, b = p.replace(" ", ""), r.replace(" ", "")
    else:
        raise ValueError(f"unknown edit distance level {level!r}; choose from token, char")
    denom = max(len(a), len(b))
    if denom == 0:
        return 0.0
    return Levenshtein.distance(a, b) / denom


def exact_match(pred: str, ref: str) -> bool:
    """True when the normalized prediction equals the normalized reference."""
    return _norm_cached(pred or "") == _norm_cached(ref or "")


# ---------------------------------------------------------------------------
# Teacher-forced token accuracy
# ---------------------------------------------------------------------------


def argmax_hits(logits, targets):
    """How many rows of ``logits`` [N, V] have their argmax at ``targets`` [N] (a 0-d tensor).

    The one count behind every token accuracy: training's ``token_acc``/``eval_acc``
    (``train/loss.py``, on the response positions it keeps), ``ocrtune eval --metrics acc``
    (``infer/dataset.py:token_accuracy`` runs that training loss teacher-forced) and
    :func:`token_accuracy` below (full logits, shifted and masked here)."""
    return (logits.argmax(-1) == targets).sum()


def token_accuracy(logits, labels, ignore_index: int = -100) -> tuple[int, int]:
    """Shifted next-token accuracy for causal LM outputs.

    ``logits``: float tensor [B, T, V] (argmax is taken) or integer predicted
    ids [B, T]; ``labels``: [B, T] with ``ignore_index`` on positions that do
    not count.  The prediction at position t is compared with ``labels[t+1]``.
    Returns ``(correct, total)`` as Python ints. The count is :func:`argmax_hits`.
    """
    import torch

    with torch.no_grad():
        if logits.dim() == 3:
            pred_ids = logits.argmax(dim=-1)
        elif logits.dim() == 2:
            if logits.is_floating_point() or logits.is_complex():
                raise TypeError(
                    "2-D input to token_accuracy must be integer token ids; "
                    "pass logits as [B, T, V]"
                )
            pred_ids = logits
        else:
            raise ValueError(f"expected logits [B,T,V] or ids [B,T], got shape {tuple(logits.shape)}")
        if labels.dim() != 2 or tuple(labels.shape) != tuple(pred_ids.shape):
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match predictions {tuple(pred_ids.shape)}"
            )
        labels = labels.to(pred_ids.device)
        shifted_labels = labels[:, 1:]
        mask = shifted_labels != ignore_index
        total = int(mask.sum().item())
        if logits.dim() == 3:
            correct = int(argmax_hits(logits[:, :-1][mask], shifted_labels[mask]))
        else:
            correct = int((pred_ids[:, :-1][mask] == shifted_labels[mask]).sum().item())
    return correct, total


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


def per_row_metrics(pred: str, ref: str) -> dict:
    """Per-row values: ``bleu4`` (sentence BLEU), ``edit_distance_token``,
    ``edit_distance_char``, ``exact_match`` (bool)."""
    return {
        "bleu4": sentence_bleu4(pred, ref),
        "edit_distance_token": edit_distance(pred, ref, "token"),
        "edit_distance_char": edit_distance(pred, ref, "char"),
        "exact_match": exact_match(pred, ref),
    }


def _check_lengths(preds: Sequence, refs: Sequence) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions but {len(refs)} references")


def _parse_names(names: Iterable[str] | str) -> list[str]:
    if isinstance(names, str):
        names = names.split(",")
    out: list[str] = []
    for raw in names:
        name = str(raw).strip().lower()
        if not name:
            continue
        if name not in METRIC_NAMES:
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRIC_NAMES)}")
        if name not in out:
            out.append(name)
    return out


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def compute_metrics(
    preds: Sequence[str],
    refs: Sequence[str],
    names: Iterable[str] | str = ("bleu", "edit_distance", "exact_match"),
    *,
    render_engine: str = "mathtext",
    tex_root: str | None = None,
) -> dict:
    """Summary metrics over a corpus.

    ``names`` (any of bleu, edit_distance, exact_match, render, cdm; a
    comma-separated string also works) selects the keys:

    * bleu          -> ``bleu4`` (corpus BLEU-4, 0..1)
    * edit_distance -> ``edit_distance_token``, ``edit_distance_char`` (means)
    * exact_match   -> ``exact_match`` (share of rows)
    * render        -> ``render_match``, ``render_fail_pred``, ``render_fail_ref``
    * cdm           -> ``cdm`` (mean per-row F1), ``exprate_cdm`` (share of rows with F1 1); pdflatex
      from ``tex_root`` or PATH

    ``count`` (number of rows) is always present.  Empty input gives 0.0 for
    every metric.
    """
    wanted = _parse_names(names)
    preds = ["" if p is None else str(p) for p in preds]
    refs = ["" if r is None else str(r) for r in refs]
    _check_lengths(preds, refs)

    out: dict = {}
    if "bleu" in wanted:
        out["bleu4"] = bleu4(preds, refs)
    if "edit_distance" in wanted:
        out["edit_distance_token"] = _mean([edit_distance(p, r, "token") for p, r in zip(preds, refs)])
        out["edit_distance_char"] = _mean([edit_distance(p, r, "char") for p, r in zip(preds, refs)])
    if "exact_match" in wanted:
        out["exact_match"] = _mean([float(exact_match(p, r)) for p, r in zip(preds, refs)])
    if "render" in wanted:
        from ocrtune.evaluate import render

        out.update(render.render_check(preds, refs, engine=render_engine))
    if "cdm" in wanted:
        from ocrtune.evaluate.cdm import cdm_scores, cdm_summary

        out.update(cdm_summary(cdm_scores(preds, refs, tex_root=tex_root)))
    out["count"] = len(preds)
    return out
