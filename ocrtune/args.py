"""Argument helpers every command shares (foundation layer; issue 14).

`arg()` declares a dataclass field with its help text, aliases, choices and environment default;
`given_flags()` says which fields were set explicitly. Moved here from `ocrtune/train/args.py` and
`ocrtune/cli/parsing.py`, which re-export them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import field


def arg(default=None, help: str = "", aliases: tuple[str, ...] = (), choices=None, env: str | None = None):
    return field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices, "env": env})


def given_flags(args) -> set[str]:
    """Fields set explicitly: on the command line when `args` came from `build`, otherwise (built in
    Python) those that differ from the dataclass defaults. Environment-variable defaults don't count."""
    given = getattr(args, "_given_flags", None)
    if given is not None:
        return set(given)
    return {f.name for f in dataclasses.fields(args) if getattr(args, f.name) != f.default}
