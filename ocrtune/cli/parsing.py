"""Dataclass arguments -> argparse, with SWIFT-style `--flag true/false` booleans, aliases, and a
few environment variables (MAX_PIXELS, MAX_STEPS, ...) as defaults that flags override."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import types
import typing

from ocrtune.args import check_domains
from ocrtune.errors import UserError

TRUE, FALSE = {"true", "1", "yes", "y", "on"}, {"false", "0", "no", "n", "off"}


def str2bool(v: str) -> bool:
    s = str(v).strip().lower()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{v}'")


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus an error over two lines and exits 2; we say it in one line."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}", f"run '{self.prog} --help' to see the flags")


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    return tp


def show_default(value) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def help_text(f: dataclasses.Field) -> str:
    """The field's help with its default and environment variable (argparse's own default display
    can't be used: defaults are suppressed so that only given flags reach `build`)."""
    text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if "default" not in text:
        text += f" (default: {show_default(default)})"
    if f.metadata.get("domain"):
        text += f" (allowed: {f.metadata['domain'].allowed()})"
    if f.metadata.get("env"):
        text += f" (env {f.metadata['env']})"
    return text.replace("%", "%%")


def add_dataclass_args(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        tp = _base_type(hints[f.name])
        names = [f"--{f.name}", *meta.get("aliases", ())]
        kwargs = {"dest": f.name, "help": help_text(f), "default": argparse.SUPPRESS}
        if tp is bool:
            kwargs.update(type=str2bool, metavar="true|false", nargs="?", const=True)
        elif typing.get_origin(tp) in (list, typing.List):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs.update(nargs="+", type=item)
        else:
            kwargs.update(type=tp)
        if meta.get("choices"):
            kwargs["choices"] = meta["choices"]
        parser.add_argument(*names, **kwargs)


_hints = functools.cache(typing.get_type_hints)  # a class's hints don't change; resolving them is most of `build`


def build(cls, namespace: argparse.Namespace):
    """Dataclass instance from parsed flags; fields not given fall back to env vars, then defaults."""
    hints = _hints(cls)
    values, from_env = {}, {}
    for f in dataclasses.fields(cls):
        if hasattr(namespace, f.name):
            values[f.name] = getattr(namespace, f.name)
        elif f.metadata.get("env") and os.environ.get(f.metadata["env"]):
            raw = os.environ[f.metadata["env"]]
            from_env[f.name] = f.metadata["env"]
            tp = _base_type(hints[f.name])
            try:
                values[f.name] = str2bool(raw) if tp is bool else tp(raw)
            except (ValueError, argparse.ArgumentTypeError):
                what = {bool: "true or false", int: "a whole number", float: "a number"}.get(tp, tp.__name__)
                raise UserError(f"environment variable {f.metadata['env']}={raw!r} (--{f.name}) is not {what}",
                                f"set it to {what} or unset it") from None
    # lists given as one comma-separated value (e.g. --target_modules q_proj,v_proj) are split
    for k, v in values.items():
        if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str) and "," in v[0] and k != "dataset":
            values[k] = [s.strip() for s in v[0].split(",") if s.strip()]
    obj = cls(**values)
    check_domains(obj, from_env)  # every command's numbers, given or from the environment, before any work
    # which flags the command line set (defaults are SUPPRESSed, so only given ones are in the namespace);
    # a resumed run lets these, and only these, override its saved settings
    obj._given_flags = frozenset(f.name for f in dataclasses.fields(cls) if hasattr(namespace, f.name))
    return obj

