#!/usr/bin/env bash
# The cuda-marker suite (tests/test_cuda.py: kernels vs stock forwards, packed vs padded, fused LoRA vs
# PEFT, bf16 on CUDA; tests/test_static_decode.py: CUDA-graph decoding vs eager and generate) on the GPU
# machine, in one call from the repository root:
#
#     bash bench/run_cuda_tests.sh          # results: $OUT/cuda_tests.xml (JUnit), $OUT/cuda_tests_log.txt
#
# Carried wheels are installed first when present (offline machine): .whl_bench/ (liger-kernel, for the
# Liger variant; skipped without it) and .whl/ (datasets, pytest if the machine lacks them). Then the
# patch-point checks of tests/test_qwen_vl.py run against the machine's transformers/PEFT (the private
# names PATCH_POINTS relies on must exist there too): $OUT/qwen_vl_tests.xml. Exit status: the cuda suite's.
# Only these two files are collected: the rest of tests/ needs packages (pexpect, playwright, ...) that
# the GPU machine may not have, and a collection error would stop the run.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for d in .whl_bench .whl; do
  if ls "$d"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$d"/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OCRTUNE_CACHE=${OCRTUNE_CACHE:-/tmp/occ} OCRTUNE_TEST_CACHE=${OCRTUNE_TEST_CACHE:-/tmp/occ}
if ! python3 -c "import pytest" 2>/dev/null; then
  echo "pytest is not installed here: carry its wheels (pytest, pluggy, iniconfig) in .whl/" | tee "$OUT/cuda_tests_log.txt"
  exit 3
fi
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
} 2>&1 | tee "$OUT/cuda_tests_versions.txt"
python3 -m pytest -m cuda tests/test_cuda.py tests/test_static_decode.py -q -rs -p no:cacheprovider \
  --junitxml="$OUT/cuda_tests.xml" 2>&1 \
  | tee "$OUT/cuda_tests_log.txt"
status=$?
python3 -m pytest tests/test_qwen_vl.py -q -rs -p no:cacheprovider --junitxml="$OUT/qwen_vl_tests.xml" 2>&1 \
  | tail -n 40 | tee "$OUT/qwen_vl_tests_log.txt"
exit $status
