#!/usr/bin/env bash
# GPU-machine wrapper of examples/latex_ocr_from_scratch.py: installs the carried wheels the machine lacks
# (WHEELS, default .whl: datasets, dill, multiprocess, rapidfuzz, pypdfium2), unpacks the portable TeX
# (TEX_BUNDLE, default .carry/tex/texbundle.tar.xz, made by scripts/make_tex_bundle.sh) for ocrtune synth,
# then runs the recipe with the arguments given. Two calls back to back:
#   bash examples/latex_ocr_from_scratch.sh --phase train --data_dir .carry/latex --report_dir "$OUT"
#   bash examples/latex_ocr_from_scratch.sh --phase rest --data_dir .carry/latex --report_dir "$OUT"
# RECIPE_PY=bench/learning/sweep_stage1.py runs that script instead, with the same set-up.
set -uo pipefail
export LATEX_OCR_T0=$(date +%s.%N)  # the deadline counts from here
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
if ! python3 -c "import datasets, rapidfuzz, pypdfium2" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  # datasets 5 needs pyarrow >= 24: on an older pyarrow take WHEELS_ALT (datasets 4.0, dill 0.3.8, multiprocess 0.70.16)
  if ! python3 -c "import datasets; datasets.Dataset.from_dict({'a': [1]}).map(lambda r: r)" >/dev/null 2>&1 && [ -d "${WHEELS_ALT:-.whl_alt}" ]; then
    rm -rf /tmp/site/datasets* /tmp/site/dill* /tmp/site/multiprocess*
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS_ALT:-.whl_alt}"/*.whl || exit 1
  fi
fi
TEX_BUNDLE=${TEX_BUNDLE:-.carry/tex/texbundle.tar.xz}
if [ -z "${OCRTUNE_TEX_ROOT:-}" ] && ! command -v pdflatex >/dev/null && [ -f "$TEX_BUNDLE" ]; then
  mkdir -p /tmp/tex && tar -xJf "$TEX_BUNDLE" -C /tmp/tex && export OCRTUNE_TEX_ROOT=/tmp/tex
fi
python3 -c "import datasets, pyarrow; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec python3 "${RECIPE_PY:-examples/latex_ocr_from_scratch.py}" "$@"  # RECIPE_PY: another script, same set-up
