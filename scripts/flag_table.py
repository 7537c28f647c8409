"""The markdown flag tables of the docs, made from the argument dataclasses (the parsers' one source).

    python scripts/flag_table.py sft        print one table (sft, rlhf, infer, export, serve, synth)
    python scripts/flag_table.py --write    rewrite every table in docs/ between its markers
    python scripts/flag_table.py --check    exit 1 naming the stale tables (tests/test_docs.py does the same)

A table lives in its page between `<!-- flag-table: NAME -->` and `<!-- /flag-table -->`; everything outside the
markers is left as it is.
"""
import dataclasses
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# table name -> the page that holds it (relative to the repository root)
PAGES = {
    "sft": "docs/training.md",
    "synth": "docs/synthetic-data.md",
    "infer": "docs/inference.md",
    "export": "docs/inference.md",
    "serve": "docs/serving.md",
    "rlhf": "docs/rlhf.md",
}

MARKED = re.compile(r"(<!-- flag-table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /flag-table -->)", re.S)


def args_class(name: str):
    """The dataclass whose fields are that command's flags (imported late: serve and synth pull in more)."""
    if name == "sft":
        from ocrtune.train.args import SftArgs
        return SftArgs
    if name == "rlhf":
        from ocrtune.rl.args import RlhfArgs
        return RlhfArgs
    if name == "infer":
        from ocrtune.infer.args import InferArgs
        return InferArgs
    if name == "export":
        from ocrtune.export.args import ExportArgs
        return ExportArgs
    if name == "serve":
        from ocrtune.serve.args import ServeArgs
        return ServeArgs
    if name == "synth":
        from ocrtune.synth.run import SynthArgs
        return SynthArgs
    raise SystemExit(f"error: unknown flag table {name!r}; use one of: {', '.join(PAGES)}")


def table(cls) -> str:
    """The flags `cls` declares itself: a subclass's table (rlhf's over sft's) lists what it adds or changes."""
    rows = ["| flag (aliases) | default | what it does |", "| --- | --- | --- |"]
    own = set(vars(cls).get("__annotations__", {}))
    for f in dataclasses.fields(cls):
        if f.name not in own:
            continue
        m = f.metadata
        names = ", ".join([f"`--{f.name}`", *[f"`{a}`" for a in m.get("aliases", ())]])
        env = f" (env `{m['env']}`)" if m.get("env") else ""
        default = f.default if f.default is not dataclasses.MISSING else ""
        help_ = m.get("help", "").replace("|", "\\|")
        choices = f" Choices: {', '.join(map(str, m['choices']))}." if m.get("choices") else ""
        rows.append(f"| {names}{env} | `{default}` | {help_}{choices} |")
    return "\n".join(rows)


def render(text: str) -> str:
    """The page's text with every marked table regenerated."""
    return MARKED.sub(lambda m: f"{m.group(1)}{table(args_class(m.group('name')))}\n{m.group(4)}", text)


def marked_tables(text: str) -> dict:
    """{table name: its body as the page has it}."""
    return {m.group("name"): m.group("body") for m in MARKED.finditer(text)}


def stale_pages(root: Path = ROOT) -> list:
    return [page for page in sorted(set(PAGES.values()))
            if render((root / page).read_text()) != (root / page).read_text()]


def write(root: Path = ROOT) -> list:
    changed = stale_pages(root)
    for page in changed:
        path = root / page
        path.write_text(render(path.read_text()))
    return changed


if __name__ == "__main__":
    arg = sys.argv[1] if len(sys.argv) > 1 else "sft"
    if arg == "--write":
        print("\n".join(f"rewrote {p}" for p in write()) or "all flag tables up to date")
    elif arg == "--check":
        stale = stale_pages()
        print("\n".join(f"stale flag table(s) in {p}; run python scripts/flag_table.py --write" for p in stale)
              or "all flag tables up to date")
        sys.exit(1 if stale else 0)
    else:
        print(table(args_class(arg)))
