"""New formulas from old ones: swap tokens within their class and splice `{...}` groups between formulas; with
`recombine`, a share of them is the head of one formula joined to the tail of another at a top-level relation or
comma (a new overall structure); with `scramble`, a share also has most of its symbols redrawn (the structure kept,
the symbols unpredictable).

Formulas are space-tokenized like LaTeX_OCR's (`\\frac { a } { b }`), and so are the new ones.
"""
from __future__ import annotations

import random

GREEK = ("alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi pi varpi "
         "rho varrho sigma varsigma tau upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Pi Sigma "
         "Upsilon Phi Psi Omega").split()
# Tokens of one class can replace each other and leave a formula that still compiles (mostly).
CLASSES = {
    "letter": [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)],
    "digit": list("0123456789"),
    "greek": ["\\" + g for g in GREEK],
    "operator": "+ - \\pm \\mp \\times \\cdot \\div * / \\ast \\circ \\otimes \\oplus \\wedge \\vee \\cap \\cup".split(),
    "relation": ("= < > \\leq \\geq \\neq \\approx \\sim \\simeq \\equiv \\to \\rightarrow \\leftarrow \\Rightarrow "
                 "\\in \\subset \\subseteq \\propto \\mapsto \\ll \\gg \\le \\ge \\ne").split(),
    "bigop": "\\sum \\prod \\int \\oint \\iint \\bigcup \\bigcap \\coprod \\bigoplus \\bigotimes".split(),
    "function": ("\\sin \\cos \\tan \\cot \\sec \\csc \\log \\ln \\exp \\lim \\max \\min \\sup \\inf \\det \\arg "
                 "\\dim \\ker \\sinh \\cosh \\tanh \\arcsin \\arccos \\arctan \\deg \\gcd \\lg").split(),
}
CLASS_OF = {tok: name for name, toks in CLASSES.items() for tok in toks}


def normalize(formula: str) -> str:
    """The form formulas are compared in: whitespace runs collapsed."""
    return " ".join(formula.split())


def groups(tokens: list[str]) -> list[tuple[int, int]]:
    """(start, end) token spans of every balanced `{ ... }` group, braces included."""
    spans, stack = [], []
    for i, t in enumerate(tokens):
        if t == "{":
            stack.append(i)
        elif t == "}" and stack:
            spans.append((stack.pop(), i + 1))
    return spans


def swap_tokens(tokens: list[str], rng: random.Random) -> list[str]:
    """Replace 1-3 classed tokens with other members of their class."""
    slots = [i for i, t in enumerate(tokens) if t in CLASS_OF]
    if not slots:
        return tokens
    out = list(tokens)
    for i in rng.sample(slots, min(len(slots), rng.randint(1, 3))):
        out[i] = rng.choice(CLASSES[CLASS_OF[out[i]]])
    return out


def splice(tokens: list[str], donor: list[str], rng: random.Random) -> list[str]:
    """Replace one `{...}` group of `tokens` with one from `donor`."""
    mine, theirs = groups(tokens), groups(donor)
    if not mine or not theirs:
        return tokens
    (a, b), (c, d) = rng.choice(mine), rng.choice(theirs)
    return tokens[:a] + donor[c:d] + tokens[b:]


# where a formula can be cut in two and joined to another's other part: a relation, comma or space at nesting depth 0
CUTS = frozenset(CLASSES["relation"]) | {",", ";", "\\quad", "\\qquad"}
OPENS, CLOSES = frozenset({"{", "\\left", "\\begin"}), frozenset({"}", "\\right", "\\end"})


def top_level_cuts(tokens: list[str]) -> list[int]:
    """Indices of CUTS tokens outside every `{...}`, `\\left ... \\right` and `\\begin ... \\end` (not first or last)."""
    cuts, depth = [], 0
    for i, t in enumerate(tokens):
        if t in OPENS:
            depth += 1
        elif t in CLOSES:
            depth -= 1
        elif depth == 0 and t in CUTS and 0 < i < len(tokens) - 1:
            cuts.append(i)
    return cuts


def recombine_tokens(tokens: list[str], donor: list[str], rng: random.Random) -> list[str]:
    """The head of `tokens` up to one of its top-level cuts, then `donor` from one of its own: `a = b` and
    `c \\leq d` give `a \\leq d`. Unchanged when either has no top-level cut."""
    mine, theirs = top_level_cuts(tokens), top_level_cuts(donor)
    if not mine or not theirs:
        return tokens
    return tokens[:rng.choice(mine)] + donor[rng.choice(theirs):]


def scramble_tokens(tokens: list[str], rng: random.Random, p: float) -> list[str]:
    """Redraw each classed token (letter, digit, Greek letter, operator, relation, big operator, function name)
    from its class with probability p; braces, scripts, fractions and every other command stay where they are."""
    return [rng.choice(CLASSES[CLASS_OF[t]]) if t in CLASS_OF and rng.random() < p else t for t in tokens]


def mutate(formulas: list[str], n: int, seed: int, exclude: set[str] = frozenset(), max_tokens: int = 400,
           scramble: float = 0.0, recombine: float = 0.0) -> list[str]:
    """`n` new distinct formulas (normalized), none equal to an input or excluded formula after normalizing.

    `scramble`: the share of them whose classed tokens are then each redrawn with a probability between 0.5 and 1
    (per formula): real formulas' layouts with symbols a language model can't guess from the ones around them, so
    that a model trained on them has to read its image (mutations alone keep most of a train formula, and a
    from-scratch model learned their language instead of reading). 0 gives exactly the
    mutations of before. `recombine`: the share of them (drawn before scrambling) whose head is joined to another
    input's tail at top-level relations or commas (`recombine_tokens`): mutations keep a train formula's overall
    structure, which a from-scratch model learned (train token accuracy 0.86 against validation 0.77). 0 draws nothing.
    Deterministic for a given input order, seed, scramble and recombine. Stops early (fewer than n) when the
    attempts run out.
    """
    sources = [normalize(f).split(" ") for f in formulas if normalize(f)]
    if not sources or n <= 0:
        return []
    rng = random.Random(seed)
    seen = {normalize(f) for f in formulas} | set(exclude)
    out: list[str] = []
    for _ in range(max(1000, 50 * n)):
        if len(out) >= n:
            break
        tokens = rng.choice(sources)
        if rng.random() < 0.5:
            tokens = swap_tokens(tokens, rng)
        else:
            tokens = splice(tokens, rng.choice(sources), rng)
            if rng.random() < 0.5:
                tokens = swap_tokens(tokens, rng)
        if recombine and rng.random() < recombine:  # no draws at 0, as for scramble
            tokens = recombine_tokens(tokens, rng.choice(sources), rng)
        if scramble and rng.random() < scramble:  # no draws at scramble 0: the same formulas as without it
            tokens = scramble_tokens(tokens, rng, rng.uniform(0.5, 1.0))
        candidate = " ".join(tokens)
        if len(tokens) <= max_tokens and candidate not in seen:
            seen.add(candidate)
            out.append(candidate)
    return out
