"""--check_dataset_strategy: find rows that can't be trained on, before training starts."""
from __future__ import annotations

import logging
from collections import Counter

import datasets

from ocrtune.data.images import BadImage, open_image
from ocrtune.data.parallel import auto_num_proc, column_list
from ocrtune.errors import UserError

log = logging.getLogger("ocrtune")
STRATEGIES = ("none", "discard", "error", "warning")


TOO_LONG = "over --max_length"
MAX_TEXT_CHARS = 1_000_000  # far past any --max_length: a longer message is refused before it is tokenized


def text_problem(msgs: list[dict]) -> str | None:
    """A message too long to tokenize (a 100 MB string would take minutes and gigabytes), or None."""
    for m in msgs:
        content = m.get("content")
        if isinstance(content, str) and len(content) > MAX_TEXT_CHARS:
            return f"{m.get('role')} text is {len(content)} characters, over the {MAX_TEXT_CHARS} limit"
    return None


def row_problem(row: dict, max_image_pixels: int | None = None, template=None) -> str | None:
    """Why `row` can't be used (a short reason), or None if it is fine. With a `template` (one with
    max_length set) a row whose encoding would be longer than --max_length is a problem too."""
    msgs = row.get("messages") or []
    if not msgs:
        return "no messages"
    for m in msgs:
        if str(m.get("role")).startswith("<invalid: "):  # a `messages` of the wrong shape (data/loading.py)
            return m["role"][len("<invalid: "):-1]
        if m.get("role") not in ("system", "user", "assistant"):
            return f"unknown role {m.get('role')!r}"
        if not isinstance(m.get("content"), str):
            return f"{m.get('role')} content is missing or not a string"
    if text_problem(msgs):
        return text_problem(msgs)
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        return "empty response"
    if not any(m["role"] == "user" for m in msgs):
        return "no user query"
    tags = sum(m["content"].count("<image>") for m in msgs)
    if tags > len(row.get("images") or []):
        return f"{tags} <image> tags but {len(row.get('images') or [])} images"
    sizes = []
    for ref in row.get("images") or []:
        try:
            sizes.append(open_image(ref, **({"max_image_pixels": max_image_pixels} if max_image_pixels else {})).size)
        except BadImage as e:
            return str(e)
    if template is not None and template.max_length:
        n = template.token_count(msgs, sizes)
        if n > template.max_length:
            return f"sample has {n} tokens, {TOO_LONG} {template.max_length}"
    return None


def _reason_kind(problem: str) -> str:
    if problem.startswith("messages"):  # the shapes data/loading.py refuses: one kind in the summary
        return "messages of the wrong shape"
    for key in (TOO_LONG, "an aspect ratio over", "once padded", "not found", "not a readable image", "pixels, over", "too large", "empty response", "is empty",
                "not a string", "unknown role", "<image> tags", "URL", "folder", "can't be read", "not a regular file",
                "-byte limit", "characters, over"):
        if key in problem:
            return {"pixels, over": "too many pixels", "once padded": "too many pixels", TOO_LONG: "longer than --max_length",
                    "an aspect ratio over": "aspect ratio over 200:1", "-byte limit": "file too large",
                    "characters, over": "text too long"}.get(key, key)
    return problem[:40]


def check_dataset(ds: datasets.Dataset, strategy: str, source: str = "dataset", num_proc: int | None = None,
                  template=None) -> datasets.Dataset:
    """Apply the strategy: none trusts the data; error stops at the first bad row; discard drops bad
    rows and reports counts by reason; warning logs each bad row, then drops it so training goes on.
    Rows longer than the template's max_length are dropped and counted under every strategy but
    none (too long for this run is not bad data, so it never stops one). Rows are named by their
    row in the file (`_row`, kept through sampling and splits), not their place here."""
    if strategy not in STRATEGIES:
        raise UserError(f"bad --check_dataset_strategy '{strategy}'", f"choose one of {', '.join(STRATEGIES)}")
    if strategy != "none":
        problems = ds.map(lambda r: {"_problem": row_problem(r, template=template) or ""},
                          remove_columns=ds.column_names, num_proc=num_proc or auto_num_proc(len(ds)),
                          desc=f"checking {source}")
        problems = column_list(problems, "_problem")
        rows = column_list(ds, "_row") if "_row" in ds.column_names else range(len(ds))
        bad = [(i, row, p) for i, (row, p) in enumerate(zip(rows, problems)) if p]
        broken = [b for b in bad if TOO_LONG not in b[2]]
        if broken and strategy == "error":
            _, row, p = broken[0]
            raise UserError(f"row {row} of {source}: {p}",
                            "fix or remove the row, or pass --check_dataset_strategy discard to drop bad rows")
        if bad:
            if strategy == "warning":
                for _, row, p in bad:
                    log.warning("row %d of %s: %s (row skipped)", row, source, p)
            counts = Counter(_reason_kind(p) for _, _, p in bad)
            log.warning("%s: dropped %d of %d rows (%s)", source, len(bad), len(ds),
                        ", ".join(f"{k}: {v}" for k, v in counts.most_common()))
            keep = set(range(len(ds))) - {i for i, _, _ in bad}
            ds = ds.select(sorted(keep))
    if len(ds) == 0:
        raise UserError(f"{source} has no usable rows left" + ("" if strategy == "none" else " after checking"),
                        "check the data (run with --check_dataset_strategy error to see the first bad row)")
    return ds
