#!/usr/bin/env python3
"""Package a merged model folder as the bundled formula reader (`--model ocrtune-reader`): 8-bit weights, the
tokenizer, processor and chat template, and a reader.json manifest with every file's sha256
(ocrtune/models/reader.py has the format).

    python scripts/package_reader.py --model .work/from_scratch/stage1/checkpoint-N-merged --output DIR
        [--max_mb 40] [--shard_mb 15] [--keep_float16 REGEX] [--card_json card.json] [--card KEY=VALUE ...]

DIR must be new (or empty); the package is built beside it and renamed into place. To ship it, copy DIR's files
into ocrtune/models/reader_weights/. Refusals are one `error:` line, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's ocrtune

from ocrtune.errors import UserError  # noqa: E402


def parse_card(items: list[str], card_json: str | None) -> dict:
    from ocrtune.fileio import read_json
    from ocrtune.models.reader import CARD_KEYS
    card = dict(read_json(Path(card_json), fix="pass a JSON object of card fields")) if card_json else {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--card {item} is not KEY=VALUE", "e.g. --card device='1 x H200'")
        try:
            card[key] = json.loads(value)  # numbers stay numbers
        except json.JSONDecodeError:
            card[key] = value
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise UserError(f"unknown card field(s) {', '.join(unknown)}", f"use: {', '.join(CARD_KEYS)}")
    return card


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="merged model folder (config.json, *.safetensors, processor files)")
    p.add_argument("--output", required=True, help="the package folder to write (new or empty)")
    p.add_argument("--max_mb", type=float, default=40.0, help="refuse a package over this many MB (10^6 bytes)")
    p.add_argument("--shard_mb", type=float, default=15.0,
                   help="split the weights into files of at most this many MiB (the GPU machine returns files <= 16 MiB)")
    p.add_argument("--keep_float16", default=None, metavar="REGEX",
                   help="tensors whose names match stay float16 instead of int8 (e.g. embed_tokens), if 8 bits cost accuracy")
    p.add_argument("--card_json", default=None, help="a JSON object of model-card fields (figures of the evaluation)")
    p.add_argument("--card", action="append", default=[], metavar="KEY=VALUE", help="one model-card field (repeatable)")
    a = p.parse_args(argv)
    try:
        if a.max_mb <= 0 or a.shard_mb <= 0:
            raise UserError("--max_mb and --shard_mb must be positive", "pass sizes in MB, e.g. --max_mb 40")
        from ocrtune.models.reader import write_package
        if a.keep_float16:
            try:
                re.compile(a.keep_float16)
            except re.error as e:
                raise UserError(f"--keep_float16 {a.keep_float16!r} is not a regular expression ({e})",
                                "pass a Python regex, e.g. embed_tokens") from None
        m = write_package(a.model, a.output, max_mb=a.max_mb, shard_mb=a.shard_mb, card=parse_card(a.card, a.card_json),
                          keep_float16=a.keep_float16)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output's folder not writable, the disk full
        print(f"error: could not write the package {a.output}: {e.strerror or e}; check the folder and free space",
              file=sys.stderr)
        return 2
    print(f"{a.output}: {m['package_bytes'] / 1e6:.2f} MB, {m['parameters']:,} parameters, weights in "
          f"{len(m['weights'])} file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
