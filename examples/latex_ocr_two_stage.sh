#!/usr/bin/env bash
# Two-stage LaTeX OCR run (see examples/latex_ocr_two_stage.py): installs what the machine lacks
# from carried wheels, then runs the recipe. Arguments go to the recipe. One device call may run 10
# minutes, so run it as two calls back to back on the same machine (stage 1 waits in .work/latex_two_stage):
#   bash examples/latex_ocr_two_stage.sh --phase stage1 --data_dir .carry/latex5 --report_dir "$OUT"
#   bash examples/latex_ocr_two_stage.sh --phase rest --data_dir .carry/latex5 --report_dir "$OUT"
# (the second call's report covers both), or all in one call with a shorter stage 1:
#   bash examples/latex_ocr_two_stage.sh --data_dir .carry/latex5 --report_dir "$OUT"
# WHEELS: folder of python 3.12 wheels for datasets, dill, multiprocess, rapidfuzz (with alt/ holding
# an older datasets for machines whose pyarrow is older than 24).
set -uo pipefail
export LATEX_OCR_T0=$(date +%s.%N)  # each phase's --deadline_seconds counts from here
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.carry/whl5}
if ! python3 -c "import datasets, rapidfuzz, sacrebleu" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  if ! python3 -c "import datasets; datasets.Dataset.from_dict({'a': [1]}).map(lambda r: r)" >/dev/null 2>&1; then
    echo "datasets $(ls "$WHEELS"/datasets-*.whl) does not work here (pyarrow $(python3 -c 'import pyarrow; print(pyarrow.__version__)')); trying $WHEELS/alt"
    rm -rf /tmp/site && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      "$WHEELS"/alt/*.whl "$WHEELS"/rapidfuzz-*.whl || exit 1
  fi
fi
python3 -c "import datasets, pyarrow, rapidfuzz, sacrebleu, matplotlib; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
export PYTHONPATH=$PWD:${PYTHONPATH:-}
exec python3 examples/latex_ocr_two_stage.py "$@"
