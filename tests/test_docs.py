"""The docs stay true to the repository: every relative link resolves, every flag table is the parsers' own, and
the README's test command is the one CI runs."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def _flag_table():
    spec = importlib.util.spec_from_file_location("flag_table", ROOT / "scripts" / "flag_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set:
    found, seen = set(), {}
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(page: Path):
    for m in LINK.finditer(FENCE.sub("", page.read_text())):
        target = m.group(1) or m.group(2)
        if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked here
            yield target


def test_slug_follows_github():
    assert slug("Fine-tuning: `ocrtune sft`") == "fine-tuning-ocrtune-sft"
    assert slug("Results on LaTeX_OCR") == "results-on-latex_ocr"
    assert slug("`ocrtune infer` / `ocrtune eval` flags") == "ocrtune-infer--ocrtune-eval-flags"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_every_flag_table_matches_its_parser():
    ft = _flag_table()
    for page in sorted(set(ft.PAGES.values())):
        text = (ROOT / page).read_text()
        names = [n for n, p in ft.PAGES.items() if p == page]
        tables = ft.marked_tables(text)
        assert sorted(tables) == sorted(names), f"{page} must hold the marked tables {names}"
        for name in names:
            expected = ft.table(ft.args_class(name)) + "\n"
            assert tables[name] == expected, (
                f"the {name} flag table in {page} is stale; run `python scripts/flag_table.py --write`")


def test_flag_table_write_rewrites_only_the_marked_table(tmp_path):
    ft = _flag_table()
    page = tmp_path / "docs" / "serving.md"
    page.parent.mkdir()
    page.write_text("intro\n<!-- flag-table: serve -->\n| old |\n<!-- /flag-table -->\noutro\n")
    for other in set(ft.PAGES.values()) - {"docs/serving.md"}:
        (tmp_path / other).write_text("no tables here\n")
    assert ft.write(tmp_path) == ["docs/serving.md"]
    text = page.read_text()
    assert text.startswith("intro\n<!-- flag-table: serve -->\n| flag (aliases) | default | what it does |\n")
    assert "`--api_key`" in text and "| old |" not in text and text.endswith("<!-- /flag-table -->\noutro\n")
    assert ft.write(tmp_path) == []  # a second run finds nothing to do


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == 'pip install -q -e ".[test]" && python -m pytest -q -n 2 --dist loadfile'
    first_block = (ROOT / "README.md").read_text().split("```", 2)[1]
    assert ci.replace("pip install -q ", "pip install ") in first_block  # the same command, louder
