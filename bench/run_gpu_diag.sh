#!/usr/bin/env bash
# Diagnostic pass on the GPU machine: kernel self-test, 7B step profile, variants, memory probe, handwrite.
set -o pipefail
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl_bench/*.whl && export PYTHONPATH=/tmp/site
export PYTHONUNBUFFERED=1 OCRTUNE_CACHE=/tmp/occ HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
left() { echo $((${BUDGET:-570} - SECONDS)); }
B="python3 bench/bench_sft.py --data .carry_bench/print.parquet --models 7b --liger --timeout 200"
timeout 80 python3 bench/gpu_selftest.py $OUT/selftest.json 2>&1 | grep -E "^(varlen|model)" 
timeout $(left) $B --cases bf --packing_tokens 16384 --out $OUT/diag_7b.json 2>&1 | grep -vE "Loading weights|Writing model" | tee $OUT/diag_log.txt
timeout $(left) $B --cases b --packing_tokens 16384 --lora_dropout 0 --out $OUT/diag_7b_drop0.json 2>&1 | grep -E "^\s+\{|^\|" 
timeout $(left) $B --cases p --probe 16384,32768,65536,98304,131072 --out $OUT/probe_7b.json 2>&1 | grep -E "^\s+\{|budget"
timeout $(left) python3 bench/bench_sft.py --data .carry_bench/handwrite.parquet --rows 1168 --max_pixels 602112 --models 7b --liger --timeout 200 --cases ab --packing_tokens 16384 --out $OUT/handwrite_7b.json 2>&1 | grep -E "^\s+\{|^\|"
echo "elapsed $SECONDS"
