#!/usr/bin/env bash
# The H200 calls of 2026-12-01 (third session) behind frontier_7b_lean_mlp*.json and
# cuda_tests_h200/lean_mlp_tests.xml; repository root, carry .whl .whl_bench .carry/latex
# (.carry/latex = ../shared/data/latex_ocr). Before these runs bench_frontier used the plain allocator;
# it now starts with ocrtune's default (expandable segments) unless PYTORCH_CUDA_ALLOC_CONF is set.
for d in .whl .whl_bench; do python3 -m pip install -q --no-index --no-deps --target /tmp/site $d/*.whl; done
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 OCRTUNE_CACHE=/tmp/occ OCRTUNE_TEST_CACHE=/tmp/occ
python3 -m pytest -m cuda tests/test_cuda.py -k lean_mlp -q -rs -p no:cacheprovider --junitxml=lean_mlp_tests.xml
F="python3 bench/bench_frontier.py --model 7b --liger --data .carry/latex/print/train.parquet"
PYTORCH_CUDA_ALLOC_CONF= $F --grid '16384:0;8192:0;8192:all' --overrides '{"lean_mlp": true}' --out frontier_7b_lean_mlp.json
PYTORCH_CUDA_ALLOC_CONF= $F --grid '16384:0;8192:0' --lora_dropout 0 --overrides '{"lean_mlp": true}' --out frontier_7b_lean_mlp_dropout0.json
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $F --grid '16384:0;8192:0' --lora_dropout 0 --overrides '{"lean_mlp": true}' \
  --out frontier_7b_lean_mlp_dropout0_expandable.json
