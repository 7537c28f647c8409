"""LaTeX tokenization shared by the metrics and the render check (data-style tokens).

Pure Python: imports only ``re``. A module of its own so that ``metrics`` and ``render`` share it without
importing each other.
"""

from __future__ import annotations

import re

# Token rules, matching the LaTeX_OCR (im2latex-style) data:
#   * ``\begin{name}`` / ``\end{name}``           -> one token (``\begin{array}``)
#   * ``\left`` / ``\right`` + delimiter           -> one token (``\left(``,
#     ``\right.``, ``\left\{``, ``\right\rangle``)
#   * ``\`` + letters                              -> one token (``\frac``)
#   * ``\`` + one non-letter, non-space char       -> one token (``\,`` ``\\`` ``\{``)
#   * ``\`` followed by whitespace / end (control space) -> the token ``\``
#   * any other non-space character                -> its own token
_TOKEN_RE = re.compile(
    r"""
      \\(?:begin|end)\s*\{\s*[A-Za-z]+\*?\s*\}        # environment delimiters
    | \\(?:left|right)(?![A-Za-z])\s*                   # \left / \right + delimiter
        (?:\\[A-Za-z]+|\\[^\sA-Za-z]|[^\s\\])?
    | \\[A-Za-z]+                                       # control word
    | \\[^\sA-Za-z]                                     # control symbol
    | \\                                                # control space / trailing
    | \S                                                # any other character
    """,
    re.VERBOSE,
)
_WS_RE = re.compile(r"\s+")


def tokenize_latex(s: str) -> list[str]:
    """Split LaTeX into data-style tokens (see module docstring)."""
    if not s:
        return []
    return [_WS_RE.sub("", tok) for tok in _TOKEN_RE.findall(s)]


def normalize_latex(s: str) -> str:
    """Return ``s`` re-tokenized and joined by single spaces.

    ``\\frac{a}{b}`` -> ``\\frac { a } { b }``, ``x^2`` -> ``x ^ 2``.  Already
    tokenized references come back unchanged (the function is idempotent).
    ``None`` is treated as the empty string.
    """
    if s is None:
        return ""
    return " ".join(tokenize_latex(str(s).strip()))
