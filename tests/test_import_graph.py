"""The package's import graph: every arrow points down the stage order, and nothing imports in a loop.

Read from the source with `ast` (nothing under `ocrtune` is imported, so this runs in milliseconds and
without torch). Imports inside functions count exactly like module-level ones: a lazy import hides a
loop from Python, not from the reader.

Stage order (lowest first; a unit may import units in lower layers only, never one in its own layer
or above it). It follows the data flow in docs/ARCHITECTURE.md: records -> template -> tokens/pixels ->
pack -> model -> loss -> checkpoint, then the commands that consume checkpoints.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "ocrtune"

# A unit is a subpackage (`ocrtune/train/`) or a top-level module (`ocrtune/errors.py`).
LAYERS: list[tuple[str, ...]] = [
    ("errors", "fileio", "compat", "args"),    # foundation (args: `arg()`, given_flags, shared arg groups)
    ("data", "evaluate", "plot"),              # records, images, packing; string metrics; run plots
    ("models",),                               # registry, template, loading, dtype policy, generation, patches/
    ("checkpoint",),                           # reserved: the one checkpoint-format module (write/read/resolve/merge info)
    ("train",),                                # the sft recipe: writes checkpoints
    ("rl",),                                   # rlhf (GRPO) on the sft recipe's parts; rewards
    ("export",),                               # merges checkpoints
    ("infer",),                                # loads checkpoints, answers, evaluates datasets
    ("serve", "synth"),                        # commands built on the layers above
    ("webui",),                                # the training page: launches the CLI, uses serve's host/guard layers
    ("cli",),                                  # argument parsing and dispatch
    ("__main__",),                             # `python -m ocrtune`
]
# Units in the foundation layer may import each other in this order only (errors first).
FOUNDATION_ORDER = ("errors", "fileio", "compat", "args")
PACKAGE_ROOT = "__init__"  # ocrtune/__init__.py (version): importable from anywhere

LAYER_OF = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "ocrtune":
        return None
    if len(parts) == 1:
        return PACKAGE_ROOT
    if not (PKG / parts[1]).is_dir() and not (PKG / f"{parts[1]}.py").exists():
        return PACKAGE_ROOT  # `from ocrtune import __version__`
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """(imported module or module.attr, line) for every import statement in `path`, any scope."""
    name = _module_name(path)
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                yield f"{mod}.{alias.name}", node.lineno


def _resolve_module(target: str) -> str:
    """`ocrtune.a.b.attr` -> `ocrtune.a.b` (the module file that holds it)."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        p = PKG.parent.joinpath(*parts[:n])
        if p.with_suffix(".py").exists() or (p / "__init__.py").exists():
            return ".".join(parts[:n])
    return target


def _graph():
    """unit edges {(src, dst): [file:line]}, module edges {(src, dst): [file:line]}, units seen."""
    units, module_edges = defaultdict(list), defaultdict(list)
    seen = set()
    for path in sorted(PKG.rglob("*.py")):
        src_mod = _module_name(path)
        src = _unit_of(src_mod)
        seen.add(src)
        where = f"{path.relative_to(PKG.parent)}"
        for target, line in _imports(path):
            dst = _unit_of(target)
            if dst is None:
                continue
            dst_mod = _resolve_module(target)
            if dst_mod != src_mod and f"{where}:{line}" not in module_edges[(src_mod, dst_mod)]:
                module_edges[(src_mod, dst_mod)].append(f"{where}:{line}")
            if dst != src and f"{where}:{line}" not in units[(src, dst)]:
                units[(src, dst)].append(f"{where}:{line}")
    return dict(units), dict(module_edges), seen


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative enough for ~60 nodes)."""
    adj = defaultdict(set)
    for a, b in edges:
        adj[a].add(b)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(adj[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted({a for a, _ in edges} | {b for _, b in edges}):
        if v not in index:
            visit(v)
    return out


def _allowed(src: str, dst: str) -> bool:
    if dst == PACKAGE_ROOT:
        return True
    ls, ld = LAYER_OF[src], LAYER_OF[dst]
    if ls == 0 and ld == 0:
        return FOUNDATION_ORDER.index(dst) < FOUNDATION_ORDER.index(src)
    return ld < ls


def test_every_unit_has_a_layer():
    _, _, seen = _graph()
    missing = sorted(u for u in seen - {PACKAGE_ROOT} if u not in LAYER_OF)
    assert not missing, (f"ocrtune units with no place in the stage order: {missing}; add each to LAYERS in "
                         f"{Path(__file__).name} (lowest layer that holds everything it imports)")


def test_imports_point_down_the_stage_order():
    units, _, _ = _graph()
    bad = []
    for (src, dst), where in sorted(units.items()):
        if src in LAYER_OF and (dst in LAYER_OF or dst == PACKAGE_ROOT) and not _allowed(src, dst):
            how = "its own layer" if LAYER_OF[src] == LAYER_OF[dst] else "a higher stage"
            bad.append(f"  {src} (layer {LAYER_OF[src]}) -> {dst} (layer {LAYER_OF[dst]}, {how}):\n"
                       + "".join(f"      {w}\n" for w in where))
    assert not bad, ("imports that run back up the stage order (move the imported code down, or invert the "
                     "dependency):\n" + "".join(bad))


def _cycle_report(graph: dict, level: str) -> str | None:
    """None when `graph` (edge -> import sites) has no cycle, else the cycles and their edges."""
    cycles = _cycles(graph)
    if not cycles:
        return None
    lines = []
    for comp in cycles:
        lines.append(f"  cycle between {', '.join(comp)}:")
        for (a, b), where in sorted(graph.items()):
            if a in comp and b in comp:
                lines.append(f"    {a} -> {b}: {', '.join(sorted(set(where)))}")
    return f"{level}-level import cycles:\n" + "\n".join(lines)


def test_no_package_level_cycles():
    units, _, _ = _graph()
    report = _cycle_report(units, "package")
    assert report is None, report


def test_no_module_level_cycles():
    _, modules, _ = _graph()
    report = _cycle_report(modules, "module")
    assert report is None, report


@pytest.mark.parametrize("src,dst,ok", [("train", "models", True), ("models", "train", False),
                                        ("train", "train", True), ("errors", "fileio", False),
                                        ("fileio", "errors", True), ("serve", "synth", False)])
def test_rule_itself(src, dst, ok):
    assert (src == dst or _allowed(src, dst)) is ok


def _only_imports(source: str) -> bool:
    """True for a module whose body (after its docstring and `from __future__`) is non-empty and only imports
    and `__all__`: a module that re-exports names from elsewhere instead of owning any."""
    body = ast.parse(source).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    body = [n for n in body if not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]

    def is_all(n):
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)

    return bool(body) and all(isinstance(n, (ast.Import, ast.ImportFrom)) or is_all(n) for n in body)


def test_no_module_only_re_exports():
    bad = sorted(str(p.relative_to(PKG.parent)) for p in PKG.rglob("*.py")
                 if _only_imports(p.read_text(encoding="utf-8")))
    assert not bad, ("modules that only re-export names (import them from the module that defines them, and "
                     f"delete these): {bad}")


@pytest.mark.parametrize("source,only", [
    ('"""Moved."""\nfrom __future__ import annotations\nfrom ocrtune.checkpoint import save  # noqa: F401\n', True),
    ("from ocrtune.a import b\n__all__ = ['b']\n", True),
    ("import os\nimport sys\n", True),
    ("", False),                                  # an empty __init__.py
    ('"""A package."""\n', False),
    ("from __future__ import annotations\n", False),
    ("from ocrtune.a import b\n\ndef f():\n    return b\n", False),
    ("import os\nX = os.sep\n", False),
])
def test_only_imports_rule_itself(source, only):
    assert _only_imports(source) is only


MAX_LINES = 650  # a module longer than this holds more than one job: split it along its sections


def test_no_module_is_too_long():
    long = {str(p.relative_to(PKG.parent)): n for p in sorted(PKG.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (move a cohesive piece into its own module): {long}"
