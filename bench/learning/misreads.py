"""Which reference tokens a model's predictions read: main-line symbols against those inside sub- and superscripts
(issue 13's misread analysis). Each prediction is aligned to its reference token by token (`difflib`, the longest
matching blocks); braces, `_` and `^` are left out of both counts; a token counts as script when it is the single
token or inside the `{...}` group after `_` or `^`.

    python bench/learning/misreads.py bench/learning/run17_eight_bit_h200/stage1_print_beams3.jsonl.gz
"""
from __future__ import annotations

import difflib
import gzip
import json
import sys


def script_mask(tokens: list[str]) -> list[bool | None]:
    """Per token: True inside a sub/superscript, False on the main line, None for braces, `_` and `^`."""
    out, groups, pending = [], [], False  # groups: per open brace, whether it opened a script
    for t in tokens:
        if t in ("_", "^"):
            out.append(None)
            pending = True
        elif t == "{":
            groups.append(pending)
            pending = False
            out.append(None)
        elif t == "}":
            if groups:
                groups.pop()
            out.append(None)
        else:
            out.append(any(groups) or pending)
            pending = False
    return out


def read_rates(rows: list[dict]) -> dict:
    counts = {True: [0, 0], False: [0, 0]}
    for r in rows:
        ref, pred = r["reference"].split(), (r.get("prediction") or "").split()
        hit = [False] * len(ref)
        for a, _, n in difflib.SequenceMatcher(a=ref, b=pred, autojunk=False).get_matching_blocks():
            hit[a:a + n] = [True] * n
        for script, h in zip(script_mask(ref), hit):
            if script is not None:
                counts[script][0] += h
                counts[script][1] += 1
    main, script = (counts[k][0] / max(counts[k][1], 1) for k in (False, True))
    return {"rows": len(rows), "main_line_read": round(main, 3), "script_read": round(script, 3),
            "script_over_main": round(script / main, 3) if main else None}


def main(paths: list[str]) -> None:
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            print(path, json.dumps(read_rates([json.loads(line) for line in f])))


if __name__ == "__main__":
    main(sys.argv[1:])
