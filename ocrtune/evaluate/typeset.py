"""LaTeX formulas -> one tight pdflatex page each (many formulas per run), for `ocrtune synth`'s pictures and
the cdm metric's glyph boxes.

A chunk is typeset in one pdflatex run; when any formula in it fails (an error, a missing glyph, a
loop that runs into the time limit, a fatal error that loses the PDF), draft runs find the failing
formulas and only the clean ones are typeset again, because a bad formula can change the pages after
it. Failures are skipped with a reason, never retried forever.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ocrtune.errors import UserError

APT_PACKAGES = "texlive-latex-base"  # pdflatex, amsmath, bm; amssymb and the CM/AMS fonts come with texlive-base
MARK = "@@OCRT"
# Commands that would let a formula reach outside its page: files (fonts too), the shell, global state, TeX's
# interaction mode, the page builder, the terminal (where the marks that attribute errors to formulas are printed),
# assignments that outlive the formula's group (\fontdimen is always global; \aftergroup runs tokens outside it),
# the document's own macros. A formula using one is skipped before TeX sees it. A blocklist, so best effort: TeX's
# own settings below (no shell, files opened only under the run's temp folder) are what keep files safe; what a
# missed command can still do is spoil the scores of the other formulas of its chunk.
FORBIDDEN = re.compile(r"\\(input|include|openin|openout|read|write|immediate|special|catcode|"
                       r"batchmode|nonstopmode|scrollmode|errorstopmode|end\s*\{document\}|documentclass|"
                       r"usepackage|shipout|global|gdef|xdef|pdf[a-z]*|output|jobname|endinput|csname|scantokens|font|"
                       r"message|errmessage|typeout|wlog|show[a-z]*|InputIfFileExists|IfFileExists|RequirePackage|"
                       r"LoadClass|listfiles|dump|stop|fontdimen|hyphenchar|skewchar|aftergroup|afterassignment|"
                       r"ocrtune[a-z]*)"
                       r"(?![a-zA-Z])")
MAX_FORMULA_CHARS = 16384  # the longest formula typeset: a longer one costs TeX and the metric's matching unbounded
PREAMBLE = r"""\documentclass[12pt]{article}
\usepackage{amsmath,amssymb,bm}
\pagestyle{empty}\pdfhorigin=0pt\pdfvorigin=0pt\pdfcompresslevel=0
\errorcontextlines=0 \tracinglostchars=1 \tracingonline=1
\def\ocrtunemark#1{\immediate\write16{@@OCRT #1}}
\def\ocrtuneship{\pdfpagewidth=\dimexpr\wd0+8pt\relax \pdfpageheight=\dimexpr\ht0+\dp0+8pt\relax
  \shipout\vbox{\kern4pt\hbox{\kern4pt\box0\kern4pt}\kern4pt}}
\begin{document}
"""


@dataclass
class Tex:
    """How to run pdflatex: the command and its environment (system TeX or a portable bundle)."""
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    timeout: float = 10.0  # seconds per pdflatex run; a looping formula costs about this much


def bundle_env(root: Path) -> dict[str, str]:
    """Environment that makes the bundle's pdftex find only the bundle's files (see scripts/make_tex_bundle.sh)."""
    texmf = root / "texmf"
    return {"TEXMFCNF": str(texmf), "TEXINPUTS": f".{os.pathsep}{texmf / 'tex'}//", "TFMFONTS": f"{texmf / 'fonts'}//",
            "T1FONTS": f"{texmf / 'fonts'}//", "TEXFONTMAPS": f"{texmf / 'fonts'}//", "TEXFORMATS": str(texmf / "web2c"),
            "TEXPSHEADERS": f"{texmf / 'fonts'}//", "ENCFONTS": f"{texmf / 'fonts'}//",
            "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(root / "lib"), os.environ.get("LD_LIBRARY_PATH")) if p)}


def find_tex(tex_root: str | None = None, timeout: float = 10.0, needed_by: str = "ocrtune synth") -> Tex:
    """pdflatex from `tex_root` (or $OCRTUNE_TEX_ROOT), else from PATH; a one-line error naming what
    `needed_by` it if there is none."""
    tex_root = tex_root or os.environ.get("OCRTUNE_TEX_ROOT") or None
    base = {"max_print_line": "100000", "error_line": "254", "half_error_line": "238",  # no wrapped log lines
            "openout_any": "p", "openin_any": "p", "shell_escape": "f",
            "MKTEXPK": "0", "MKTEXTFM": "0", "MKTEXMF": "0", "MKTEXFMT": "0"}  # a missing font fails, never runs METAFONT
    if tex_root:
        root = Path(tex_root).expanduser()
        if not (root / "bin").is_dir() and (root / "texbundle" / "bin").is_dir():
            root = root / "texbundle"  # the folder the archive was unpacked into
        binary = root / "bin" / "pdftex"
        if not binary.is_file() or not (root / "texmf" / "web2c" / "pdflatex.fmt").is_file():
            raise UserError(f"--tex_root {root} is not an unpacked TeX bundle (no bin/pdftex or texmf/web2c/pdflatex.fmt)",
                            "unpack the archive made by scripts/make_tex_bundle.sh and pass its folder")
        command, env = [str(binary), "-fmt=pdflatex", "-progname=pdflatex"], {**base, **bundle_env(root)}
    else:
        binary = shutil.which("pdflatex")
        if binary is None:
            raise UserError(f"{needed_by} needs LaTeX (pdflatex) and none was found on PATH",
                            f"install it with 'apt-get install {APT_PACKAGES}', or pass --tex_root / set "
                            "OCRTUNE_TEX_ROOT to a TeX bundle made by scripts/make_tex_bundle.sh")
        command, env = [binary], dict(base)
    if shutil.which("stdbuf"):  # line-buffered stdout: after a timeout, the last mark names the looping formula
        command = [shutil.which("stdbuf"), "-oL", *command]
    return Tex(command, env, timeout)


def preflight(tex: Tex) -> None:
    """Typeset one plain formula, so that a broken TeX (a missing package, a bad bundle) is one clear error
    instead of every formula failing on its own."""
    with tempfile.TemporaryDirectory(prefix="ocrtune-tex-") as tmp:
        run = run_tex(tex, ["x"], Path(tmp), draft=False)
        if run.pdf is None:
            first = next((line for line in run.output.splitlines() if line.startswith("!")), run.why or "no output")
            raise UserError(f"pdflatex ({' '.join(tex.command)}) cannot typeset a plain formula: {first[:200]}",
                            f"install {APT_PACKAGES} (it brings amsmath, amssymb and bm), or rebuild the --tex_root bundle")


def precheck(formula: str) -> str:
    """Why a formula can't go to TeX ("" if it can): empty, too long, a `$`, `^^`, unbalanced braces, or a
    forbidden command."""
    if not formula.strip():
        return "empty"
    if len(formula) > MAX_FORMULA_CHARS:
        return f"over {MAX_FORMULA_CHARS} characters"
    if "^^" in formula:  # TeX reads ^^5c as a backslash: every forbidden command could be spelled past the check
        return "TeX's ^^ character notation"
    depth, escaped = 0, False
    for ch in formula:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == "$":
            return "math shift $"  # would leave math mode: text typeset without an error
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                break
    if depth != 0:
        return "unbalanced braces"
    m = FORBIDDEN.search(formula)
    return f"forbidden command \\{m.group(1)}" if m else ""


def document(formulas: list[str]) -> str:
    """One page per formula, each preceded by a mark on the terminal (on its own line: % comments end there)."""
    parts = [PREAMBLE]
    for i, f in enumerate(formulas):
        parts.append(f"\\ocrtunemark{{{i}}}\\setbox0\\hbox{{$\\displaystyle\n{' '.join(f.splitlines())}\n$}}\\ocrtuneship\n")
    parts.append(f"\\ocrtunemark{{END}}\\end{{document}}\n")
    return "".join(parts)


@dataclass
class TexRun:
    finished: bool                # reached the end of the document
    errors: dict[int, str]        # formula position -> first error line
    last_mark: int | None         # the last formula TeX started (the culprit when it did not finish)
    why: str = ""                 # "timeout" or "fatal" when it did not finish
    pdf: Path | None = None       # when it finished with exit status 0
    output: str = ""              # what TeX printed


def run_tex(tex: Tex, formulas: list[str], workdir: Path, draft: bool) -> TexRun:
    (workdir / "f.tex").write_text(document(formulas), encoding="utf-8")
    cmd = [*tex.command, "-interaction=nonstopmode", "-no-shell-escape", *(["-draftmode"] if draft else []), "f.tex"]
    env = {**os.environ, **tex.env}
    try:
        proc = subprocess.run(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=tex.timeout)
        out, why, rc = proc.stdout, "", proc.returncode
    except subprocess.TimeoutExpired as e:
        out, why, rc = e.stdout or b"", "timeout", None
    errors, last, finished = {}, None, False
    text = out.decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith(MARK):
            tag = line[len(MARK):].strip()
            finished = tag == "END"
            last = None if finished else int(tag)
        elif last is not None and (line.startswith("! ") or line.startswith("Missing character")):
            errors.setdefault(last, line.strip())
    if not finished and not why:
        why = "fatal"
    ok = finished and rc == 0 and not draft
    return TexRun(finished, errors, last, why, workdir / "f.pdf" if ok else None, text)


def find_failures(tex: Tex, formulas: list[str], workdir: Path, run: TexRun | None = None) -> dict[int, str]:
    """Positions of the formulas that fail -> reason, from `run` (a run of these formulas already made) or a
    draft run; a run that stops early is split at its last mark and the parts rerun."""
    if not formulas:
        return {}
    run = run or run_tex(tex, formulas, workdir, draft=True)
    bad = {i: f"tex error: {msg}" for i, msg in run.errors.items()}
    if run.finished:
        return bad
    if len(formulas) == 1:
        return {0: bad.get(0, "timeout" if run.why == "timeout" else f"tex stopped: {run.errors.get(0, 'fatal error')}")}
    if run.last_mark is None:  # nothing to go on: halve
        half = len(formulas) // 2
        parts = [(0, formulas[:half]), (half, formulas[half:])]
    else:  # formulas before the last mark are judged; the last one alone, then the rest
        k = run.last_mark
        bad = {i: r for i, r in bad.items() if i < k}
        parts = [(k, formulas[k:k + 1]), (k + 1, formulas[k + 1:])]
    for start, part in parts:
        bad.update({start + i: r for i, r in find_failures(tex, part, workdir).items()})
    return bad


def pages_of(run: TexRun, n: int) -> list | None:
    """The n pages of a clean run, or None if the run was not clean."""
    import pypdfium2 as pdfium
    if run.pdf is None or run.errors:
        return None
    pdf = pdfium.PdfDocument(run.pdf.read_bytes())
    return [pdf[i] for i in range(len(pdf))] if len(pdf) == n else None


def typeset(tex: Tex, formulas: list[str], workdir: Path) -> tuple[list, dict[int, str]]:
    """Clean formulas -> (one pypdfium2 page per formula or None, failures); reruns halves when a run misbehaves
    (e.g. a font that only fails when the PDF is written)."""
    if not formulas:
        return [], {}
    run = run_tex(tex, formulas, workdir, draft=False)
    pages = pages_of(run, len(formulas))
    if pages is not None:
        return pages, {}
    if len(formulas) == 1:
        said = next((line.strip() for line in run.output.splitlines() if line.startswith("!")), "")
        return [None], {0: f"tex error when typeset: {run.errors.get(0) or run.why or said[:200] or 'no PDF'}"}
    if run.finished and run.errors:  # the run names the formulas that failed this time: drop them, go again
        keep = [i for i in range(len(formulas)) if i not in run.errors]
        pages_kept, bad_kept = typeset(tex, [formulas[i] for i in keep], workdir)
        pages: list = [None] * len(formulas)
        bad = {i: f"tex error when typeset: {msg}" for i, msg in run.errors.items()}
        for pos, i in enumerate(keep):
            pages[i] = pages_kept[pos]
            if pos in bad_kept:
                bad[i] = bad_kept[pos]
        return pages, bad
    half = len(formulas) // 2  # nothing to go on (e.g. a font that fails when the PDF is written): halve
    pages_a, bad_a = typeset(tex, formulas[:half], workdir)
    pages_b, bad_b = typeset(tex, formulas[half:], workdir)
    return pages_a + pages_b, {**bad_a, **{half + i: r for i, r in bad_b.items()}}


def typeset_formulas(tex: Tex, formulas: list[str], workdir: Path) -> list[tuple[object | None, str]]:
    """Formulas -> [(pypdfium2 page, "") or (None, why it failed)], in order: one run when every formula is
    clean, else the failing ones found and the clean ones typeset again."""
    results: list[tuple[object | None, str]] = [(None, precheck(f)) for f in formulas]
    todo = [i for i, (_, why) in enumerate(results) if not why]
    first = run_tex(tex, [formulas[i] for i in todo], workdir, draft=False) if todo else None
    pages = pages_of(first, len(todo)) if first else []
    if pages is not None:  # the usual case: every formula typeset cleanly in one run
        clean, bad = todo, {}
    else:
        bad = find_failures(tex, [formulas[i] for i in todo], workdir, run=first)
        for pos, why in bad.items():
            results[todo[pos]] = (None, why)
        clean = [i for pos, i in enumerate(todo) if pos not in bad]
        pages, bad = typeset(tex, [formulas[i] for i in clean], workdir)
    for pos, (i, page) in enumerate(zip(clean, pages)):
        results[i] = (page, "") if page is not None else (None, bad.get(pos, "tex error"))
    return results
