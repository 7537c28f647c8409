"""GRPO's rewards by name (`--reward_funcs`, weighted by `--reward_weights`), and the user's from
`--external_plugins` files. A reward is `f(completions: list[str], solutions: list[str], **kwargs) -> list[float]`
(ms-swift's ORM call: completions first, the dataset's answers second), one value per completion."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import itertools
import math
import numbers
from pathlib import Path
from typing import Callable

from ocrtune.errors import UserError, first_line

DEFAULT_REWARDS = ("edit_distance",)
MAX_PLUGIN_BYTES = 16 * 2**20  # a reward plugin is source code: a bigger file is a wrong path, read no further


def edit_distance(completions: list[str], solutions: list[str], **kwargs) -> list[float]:
    """1 - the normalized edit distance over LaTeX tokens (1.0: the same formula)."""
    from ocrtune.evaluate.metrics import edit_distance as distance
    return [1.0 - distance(c, s, "token") for c, s in zip(completions, solutions)]


def bleu(completions: list[str], solutions: list[str], **kwargs) -> list[float]:
    """Sentence BLEU-4 of the normalized LaTeX tokens, in [0, 1]."""
    from ocrtune.evaluate.metrics import sentence_bleu4
    return [sentence_bleu4(c, s) for c, s in zip(completions, solutions)]


def exact(completions: list[str], solutions: list[str], **kwargs) -> list[float]:
    """1.0 where the normalized completion equals the normalized answer, else 0.0."""
    from ocrtune.evaluate.metrics import exact_match
    return [float(exact_match(c, s)) for c, s in zip(completions, solutions)]


def cdm(completions: list[str], solutions: list[str], tex_root: str | None = None, **kwargs) -> list[float]:
    """CDM (character detection matching of the rendered formulas), in [0, 1]."""
    return list(_cdm_module().cdm_scores(completions, solutions, tex_root=tex_root))


def format_reward(completions: list[str], solutions: list[str], tex_root: str | None = None, **kwargs) -> list[float]:
    """1.0 where the completion compiles as a LaTeX formula, else 0.0."""
    return [float(ok) for ok in _cdm_module().compiles(completions, tex_root=tex_root)]


def _cdm_module():
    """ocrtune.evaluate.cdm, imported when a reward that renders runs (it needs a TeX installation)."""
    try:
        from ocrtune.evaluate import cdm as module
    except ImportError as e:
        raise UserError(f"the cdm and format rewards need ocrtune.evaluate.cdm, which can't be imported ({e})",
                        "use --reward_funcs edit_distance, bleu or exact, or install an ocrtune with CDM") from None
    return module


BUILTIN: dict[str, Callable] = {"cdm": cdm, "edit_distance": edit_distance, "bleu": bleu, "exact": exact,
                                "format": format_reward}
NEEDS_CDM = ("cdm", "format")


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: Callable
    weight: float


def load_plugins(paths: list[str] | None) -> dict[str, Callable]:
    """{name: reward} from each `--external_plugins` file: its public functions by name, and its `orms` dict
    (ms-swift's registry: a class there is instantiated without arguments)."""
    found: dict[str, Callable] = {}
    for i, path in enumerate(paths or []):
        module = _import_file(Path(path), i)
        for name, obj in vars(module).items():
            if inspect.isfunction(obj) and not name.startswith("_") and obj.__module__ == module.__name__:
                found[name] = obj
        registry = getattr(module, "orms", None)
        if isinstance(registry, dict):
            for name, obj in registry.items():
                if inspect.isclass(obj):
                    try:
                        obj = obj()
                    except Exception as e:
                        raise UserError(f"--external_plugins {path}: orms[{name!r}] = {obj.__name__}() failed "
                                        f"({type(e).__name__}: {e})", "fix the class, or register a function") from None
                if not callable(obj):
                    raise UserError(f"--external_plugins {path}: orms[{name!r}] is not callable",
                                    "register a function or a class with __call__(completions, solutions, **kwargs)")
                found[str(name)] = obj
    return found


def _import_file(path: Path, index: int):
    if not path.exists():
        raise UserError(f"--external_plugins {path} does not exist", "pass the path of a .py file")
    if not path.is_file() or path.suffix != ".py":
        raise UserError(f"--external_plugins {path} is not a Python file", "pass the path of a .py file")
    if path.stat().st_size > MAX_PLUGIN_BYTES:
        raise UserError(f"--external_plugins {path} is {path.stat().st_size:,} bytes, over the {MAX_PLUGIN_BYTES:,} a "
                        "reward plugin may have", "pass the .py file that defines the reward functions")
    spec = importlib.util.spec_from_file_location(f"ocrtune_reward_plugin_{index}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # the user's file: a SyntaxError, an import it lacks, anything it raises
        if isinstance(e, KeyboardInterrupt):
            raise
        where = f" (line {e.lineno})" if isinstance(e, SyntaxError) and e.lineno else ""
        raise UserError(f"--external_plugins {path} failed to load{where}: {type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}", "fix the file and run again") from None
    return module


def resolve(names: list[str] | None, weights: list[float] | None, plugins: list[str] | None,
            tex_root: str | None = None) -> list[Reward]:
    """The run's rewards: each name a built-in or a plugin's (a plugin's name wins), with its weight; the
    rendering ones typeset with `tex_root`'s pdflatex (else PATH's)."""
    names = list(names or DEFAULT_REWARDS)
    if weights and len(weights) != len(names):
        raise UserError(f"--reward_weights has {len(weights)} values for {len(names)} --reward_funcs",
                        "give one weight per reward")
    table = {**BUILTIN, **load_plugins(plugins)}
    for name in names:
        if name not in table:
            raise UserError(f"--reward_funcs {name}: no such reward",
                            f"use {', '.join(BUILTIN)}, or a function of an --external_plugins file")
    if len(set(names)) != len(names):
        raise UserError(f"--reward_funcs names a reward twice ({' '.join(names)})", "name each reward once")
    if any(n in NEEDS_CDM and table[n] is BUILTIN[n] for n in names):
        _cdm_module().check_tex(tex_root)  # pdflatex found and typesetting now, not at the first step (run folder made)
        table = {n: functools.partial(f, tex_root=tex_root) if n in NEEDS_CDM and f is BUILTIN[n] else f
                 for n, f in table.items()}
    return [Reward(n, table[n], float(w)) for n, w in zip(names, weights or [1.0] * len(names))]


def score(rewards: list[Reward], completions: list[str], solutions: list[str], **kwargs) -> list[list[float]]:
    """Each reward's values, [reward][completion]; a wrong count or a value that is not a finite number is a
    one-line error naming the reward."""
    out = []
    for r in rewards:
        try:
            values = _numbers(r.name, r.fn(list(completions), list(solutions), **kwargs), len(completions))
        except (UserError, KeyboardInterrupt):
            raise
        except BaseException as e:  # the reward's own failure (a user's plugin; sys.exit too): one line naming it
            raise UserError(f"reward {r.name} failed: {first_line(e)}", "fix the reward function") from e
        bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
        if bad is not None:
            raise UserError(f"reward {r.name} returned {values[bad]} for completion {bad}, not a finite number",
                            "return finite floats")
        out.append(values)
    return out


def _numbers(name: str, values, n: int) -> list[float]:
    """A reward's values as n floats, read no further than n + 1 of them (a generator may not end); a string,
    a mapping or anything that is not a real number is a one-line error naming the reward."""
    def bad(what: str):
        return UserError(f"reward {name} returned {what}, not a list of numbers", "return one float per completion")
    if isinstance(values, (str, bytes, dict, set)) or not hasattr(values, "__iter__"):
        raise bad(f"{type(values).__name__} {str(values)[:80]}")
    out = []
    for v in itertools.islice(iter(values), n + 1):
        if getattr(v, "ndim", 0) == 0 and hasattr(v, "item"):  # a numpy or torch scalar
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise bad(f"{type(v).__name__} {str(v)[:80]} among its values")
        try:
            out.append(float(v))
        except OverflowError:
            raise UserError(f"reward {name} returned {str(v)[:40]}..., too large for a float",
                            "return finite floats") from None
    if len(out) != n:
        raise UserError(f"reward {name} returned {len(out) if len(out) <= n else 'more than ' + str(n)} values for "
                        f"{n} completions", "return one float per completion, in order")
    return out
