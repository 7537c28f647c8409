#!/usr/bin/env bash
# Build a portable TeX for `ocrtune synth --tex_root` (machines without a package index): Debian's pdftex
# and the shared libraries it links (glibc excepted: the host's is used), pdflatex.fmt, and only the
# TeX files, fonts and map lines that typesetting formulas opens, as recorded by `pdflatex -recorder`.
#
#   scripts/make_tex_bundle.sh [OUT.tar.xz] [FORMULAS]
#     OUT       default texbundle.tar.xz; it unpacks to texbundle/, the folder to pass to --tex_root
#     FORMULAS  what to record with (.txt one formula a line, or .parquet/.jsonl with `text`); default: the
#               print + handwrite train formulas of ../shared/data/latex_ocr if present, else latex-ocr-sample
# Needs: apt-get install texlive-latex-base, xz-utils; python with ocrtune importable.
# Check: the bundle renders formulas with TEXMFCNF etc. pointing only into it, and the recorder shows that
# every file it opened came from the bundle (or the job's own folder).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-texbundle.tar.xz}")
FORMULAS=${2:-}
PDFTEX=$(readlink -f "$(command -v pdftex || true)")
[ -x "$PDFTEX" ] || { echo "error: pdftex not found; apt-get install texlive-latex-base" >&2; exit 2; }
work=$(mktemp -d)
trap '[ -n "${KEEP:-}" ] || rm -rf "$work"' EXIT
root=$work/texbundle
mkdir -p "$root/bin" "$root/lib" "$root/texmf/web2c" "$root/texmf/tex" "$root/texmf/fonts/map" "$work/rec" "$work/check"

# 1. Documents exactly like ocrtune synth's (same preamble), over the recording formulas plus a few that
#    reach the other math alphabets and symbol fonts; plus a small check set of 2,000.
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} python3 - "$FORMULAS" "$work" <<'EOF'
import sys
from pathlib import Path
from ocrtune.evaluate.typeset import document
from ocrtune.synth.run import read_formulas
arg, work = sys.argv[1], Path(sys.argv[2])
shared = Path("../shared/data/latex_ocr")
sources = [arg] if arg else ([str(shared / s / "train.parquet") for s in ("print", "handwrite")]
                             if (shared / "print" / "train.parquet").exists() else ["latex-ocr-sample"])
formulas = [f for s in sources for f in read_formulas(s, "train", True, 0)]
extra = [r"\mathbb { R } \mathfrak { g } \mathcal { L } \bm { x } \boldsymbol { \alpha } \lesssim \gtrsim",
         r"\mathrm { a } \mathit { b } \mathsf { c } \mathtt { d } \mathbf { e } \text { f } \operatorname { g }",
         r"x _ { \mathbb { N } _ { \mathfrak { a } _ { \bm { b } } } } \sum _ { \boldsymbol { i } } \int \oint \bigotimes",
         r"\text { \bfseries a \itshape b \scshape c \sffamily d \ttfamily e } \overbrace { a } ^ { b } \underbrace { c } _ { d }"]
(work / "rec" / "f.tex").write_text(document(formulas + extra), encoding="utf-8")
(work / "check" / "f.tex").write_text(document(formulas[::max(1, len(formulas) // 2000)][:2000]), encoding="utf-8")
print(f"recording with {len(formulas) + len(extra)} formulas from {', '.join(sources)}")
EOF
export max_print_line=100000 MKTEXPK=0 MKTEXTFM=0 MKTEXMF=0 MKTEXFMT=0
(cd "$work/rec" && timeout 900 pdflatex -recorder -interaction=nonstopmode f.tex >/dev/null 2>&1 || true)
grep '^INPUT /' "$work/rec/f.fls" | cut -d' ' -f2- | sort -u | grep -v -e '/texmf\.cnf$' -e '/\.texlive' -e '/texmf-var/' > "$work/files"

# 2. The files: TeX inputs keep their path below tex/, fonts below fonts/; the format goes to web2c/.
while IFS= read -r f; do
  case "$f" in
    */pdftex.map) ;;  # trimmed below
    *.fmt) cp "$f" "$root/texmf/web2c/" ;;
    */tex/*) d="$root/texmf/tex/${f#*/tex/}"; mkdir -p "$(dirname "$d")"; cp "$f" "$d" ;;
    */fonts/*) d="$root/texmf/fonts/${f#*/fonts/}"; mkdir -p "$(dirname "$d")"; cp "$f" "$d" ;;
    *) echo "note: not bundled: $f" >&2 ;;
  esac
done < "$work/files"
# the map lines of the bundled fonts only (pdftex.map lists thousands)
find "$root/texmf/fonts" -name '*.tfm' -printf '%f\n' | sed 's/\.tfm$//' | sort -u > "$work/tfm"
awk 'NR==FNR {keep[$1]=1; next} ($1 in keep)' "$work/tfm" "$(kpsewhich -progname=pdflatex pdftex.map)" \
  > "$root/texmf/fonts/map/pdftex.map"
# a metric without an outline (e.g. textcomp's tcrm1200, which only METAFONT could draw) is dropped, so such a
# formula fails while it is typeset (and is skipped) instead of when the PDF is written
find "$root/texmf/fonts" -name '*.tfm' | while IFS= read -r t; do
  n=$(basename "$t" .tfm); grep -q "^$n " "$root/texmf/fonts/map/pdftex.map" || { echo "note: no outline, dropped $n.tfm" >&2; rm "$t"; }
done
# the outlines and encodings those map lines name (`<cmr10.pfb`, `<[cm-super-ts1.enc`): pdftex opens them only
# while writing the PDF, which the recording run above never does when one formula hits a fatal font error
mkdir -p "$root/texmf/fonts/type1"
grep -o '<\[*[^ ]*' "$root/texmf/fonts/map/pdftex.map" | sed 's/^<\[*//' | sort -u | while IFS= read -r f; do
  [ -e "$root/texmf/fonts/type1/$f" ] || find "$root/texmf/fonts" -name "$f" | grep -q . && continue
  p=$(kpsewhich -progname=pdflatex "$f" || true)
  if [ -n "$p" ]; then cp "$p" "$root/texmf/fonts/type1/"; else echo "note: not found: $f" >&2; fi
done
# TeX's memory sizes as Debian sets them for pdflatex (the format was dumped with them)
for v in main_memory extra_mem_top extra_mem_bot font_mem_size font_max hash_extra pool_size string_vacancies \
         max_strings pool_free buf_size trie_size hyph_size nest_size max_in_open param_size save_size stack_size \
         dvi_buf_size expand_depth; do
  val=$(kpsewhich -progname=pdflatex -var-value=$v || true)
  [ -n "$val" ] && echo "$v = $val"
done > "$root/texmf/texmf.cnf"

# 3. The binary and its libraries; the format must come from this very pdftex.
cp "$PDFTEX" "$root/bin/pdftex"
ldd "$PDFTEX" | awk '/=> \// {print $3}' | grep -v -E '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*)\.so' \
  | xargs -I{} cp -L {} "$root/lib/"
fmt_version=$(head -1 "$(dirname "$(kpsewhich -engine=pdftex -progname=pdflatex pdflatex.fmt)")/pdflatex.log" | sed 's/^This is //; s/, Version / /; s/ (INITEX).*//')
bin_version=$("$PDFTEX" --version | head -1)
case "$fmt_version" in "$bin_version"*) ;; *)
  echo "error: pdflatex.fmt was made by '$fmt_version', the binary is '$bin_version'; run fmtutil-sys --byfmt pdflatex" >&2; exit 2 ;;
esac

# 4. Check: render with the bundle alone (no system TeX paths in the environment) and record what it opens.
env -i PATH=/usr/bin:/bin HOME="$work/check" max_print_line=100000 MKTEXPK=0 MKTEXTFM=0 MKTEXMF=0 MKTEXFMT=0 \
  TEXMFCNF="$root/texmf" TEXINPUTS=".:$root/texmf/tex//" TFMFONTS="$root/texmf/fonts//" T1FONTS="$root/texmf/fonts//" \
  TEXFONTMAPS="$root/texmf/fonts//" ENCFONTS="$root/texmf/fonts//" TEXPSHEADERS="$root/texmf/fonts//" \
  TEXFORMATS="$root/texmf/web2c" LD_LIBRARY_PATH="$root/lib" \
  bash -c "cd '$work/check' && timeout 600 '$root/bin/pdftex' -fmt=pdflatex -progname=pdflatex -recorder -interaction=nonstopmode f.tex" \
  > "$work/check/out.txt" 2>&1 || true
pages=$(grep -o 'Output written on f.pdf ([0-9]* pages' "$work/check/out.txt" | grep -o '[0-9]* pages' || echo "0 pages")
outside=$(grep '^INPUT ' "$work/check/f.fls" | cut -d' ' -f2- | grep -v -e "^$root/" -e '^f\.' -e "^$work/check/" | sort -u || true)
[ -z "$outside" ] || { echo "error: the bundle opened files outside itself:" >&2; echo "$outside" >&2; exit 1; }
total=$(grep -c '^\\ocrtunemark{[0-9]' "$work/check/f.tex")
echo "check: the bundle alone typeset $pages of $total formulas; every file it opened was its own"
[ "${pages%% *}" -ge $((total * 9 / 10)) ] || { echo "error: too few pages; see the files above" >&2; exit 1; }

mkdir -p "$(dirname "$OUT")"
XZ_OPT=${XZ_OPT:--9e} tar -C "$work" -cJf "$OUT.tmp" texbundle && mv "$OUT.tmp" "$OUT"
echo "wrote $OUT ($(du -h "$OUT" | cut -f1)): $(find "$root" -type f | wc -l) files; unpack it and pass the folder:"
echo "  mkdir -p tex && tar xJf $(basename "$OUT") -C tex && ocrtune synth --tex_root tex ...   (or tex/texbundle)"
